"""mlx_sa3: Stable Audio 3 in MLX."""

from . import platform as _platform

_platform.preload()  # must run before the first `import mlx` anywhere in the process

from .audio import AudioError, read_audio, write_audio  # noqa: E402
from .backend import load_autoencoder  # noqa: E402
from .loading import CheckpointError  # noqa: E402
from .model import SA3Model, load_model  # noqa: E402
from .pipeline import GenerationCancelled, GenerationOutput, GenerationRequest, StableAudio3  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "CheckpointError",
    "GenerationCancelled",
    "GenerationOutput",
    "GenerationRequest",
    "SA3Model",
    "StableAudio3",
    "load_autoencoder",
    "load_model",
    "read_audio",
    "write_audio",
]
