"""The learned parts of the official conditioner: the prompt padding embedding and the duration embedder."""

from __future__ import annotations

import mlx.core as mx

from ..loading import check_strict, to_mx
from .dit import timestep_features


class Conditioners:
    """The learned parts of the official conditioner: the prompt padding embedding and the seconds embedder.

    Tensor names are the Hub names without the ``conditioner.conditioners.`` prefix, in every layout.
    """

    PADDING = "prompt.padding_embedding"
    SECONDS_W = "seconds_total.embedder.embedding.1.weight"
    SECONDS_B = "seconds_total.embedder.embedding.1.bias"

    def __init__(self, weights: dict[str, mx.array], config):
        dim = config.cond_dim
        check_strict(
            {self.PADDING: (dim,), self.SECONDS_W: (dim, 256), self.SECONDS_B: (dim,)}, weights, "conditioner weights"
        )
        # Conditioning is cheap and feeds float32 Fourier features: keep it float32 whatever the DiT dtype.
        self.tensors = {k: v.astype(mx.float32) for k, v in weights.items()}
        self.config = config

    @property
    def padding_embedding(self) -> mx.array:
        return self.tensors[self.PADDING]

    def seconds(self, seconds) -> mx.array:
        s = mx.clip(to_mx(seconds).reshape(-1), self.config.seconds_min, self.config.seconds_max)
        s = (s - self.config.seconds_min) / (self.config.seconds_max - self.config.seconds_min)
        return (timestep_features(s, 256) @ self.tensors[self.SECONDS_W].T + self.tensors[self.SECONDS_B])[:, None, :]
