"""The torch backend's load path: the safetensors files straight into torch through the one strict load path
(TensorRefs through the MLX sanitizers and check), float32 weights memory-mapped, no MLX arrays of the weights, the
same tensors as reading them with MLX, and one-shot pipelines that drop each torch network after its stage."""

import gc
import weakref

from mlx_sa3 import StableAudio3, loading
from mlx_sa3.checkpoint import checkpoint_config, dit_weights, text_encoder_weights
from mlx_sa3.convert import convert
from mlx_sa3.loading import TensorRef, component_weights, open_source
from mlx_sa3.models import same as mlx_same
from mlx_sa3.models import t5gemma as mlx_t5
from mlx_sa3.pipeline import AudioEvent, StepEvent

import mlx.core as mx
import numpy as np
import pytest

from .conftest import REF, rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from mlx_sa3 import torch_backend as tb  # noqa: E402

CHECKPOINT = REF / "sa3_small_tiny_s0"
FIXTURES = ("sa3_small_tiny_s0", "sa3_medium_tiny_s0")  # medium: differential DiT (row reorders)
PROMPTS = ["warm analog synth pad", "x"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {name: convert(REF / name, root / name) for name in FIXTURES}


def _source(name, layout, converted):
    return open_source(REF / name if layout == "hub" else converted[name])


def _refuse_mlx_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the torch load path read weights with MLX")

    monkeypatch.setattr(loading, "load_safetensors", refuse)
    monkeypatch.setattr(mx, "load", refuse)


@pytest.mark.parametrize("layout", ["hub", "converted"])
def test_torch_load_path_creates_no_mlx_weight_arrays(monkeypatch, converted, layout):
    source = _source("sa3_small_tiny_s0", layout, converted)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    _refuse_mlx_reads(monkeypatch)
    dit = tb.load_torch_dit(source)
    autoencoder = tb.load_torch_autoencoder(source)
    text = tb.load_torch_text_encoder(source, 16)
    # MLX only built modules for the strict check's shapes: lazily, with a few bytes of random-key bookkeeping per
    # parameter, never the weights' bytes (those would have come through mx.load, refused above)
    weight_bytes = sum(
        p.numel() * p.element_size() for net in (dit.net, autoencoder.net, text.model) for p in net.parameters()
    )
    assert mx.get_peak_memory() < weight_bytes / 100
    # float32 tensors that need no copy are views of the file's memory map, not copies
    files = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in dit.net.parameters()}
    assert max(files.values()) >= sum(p.numel() * 4 for p in dit.net.parameters()) and len(files) < 10
    assert type(text.model.encoder.embed_tokens).__name__ == "TorchMappedEmbedding"
    assert autoencoder.encoder_loaded


@pytest.mark.parametrize("layout", ["hub", "converted"])
@pytest.mark.parametrize("name", FIXTURES)
def test_mapped_load_gives_the_tensors_an_mlx_read_gives(converted, name, layout):
    """Bit-identical to reading with MLX and converting (the old path), except the SAME weight-norm folds: torch
    computes them as the official torch.nn.utils.weight_norm does, MLX as g * v / ||v||: a rounding apart."""
    source = _source(name, layout, converted)
    new = tb.load_torch_dit(source).net.state_dict()
    old = tb._dit_state(dit_weights(source)[1])
    assert set(old) <= set(new)
    for key, value in old.items():
        assert torch.equal(new[key], value), key

    module = mlx_same.SAMEAutoencoder(checkpoint_config(source).same)
    new = tb.load_torch_autoencoder(source).net.state_dict()
    old = tb.same._same_state(component_weights(source, "autoencoder", mlx_same.sanitize, module, "SAME"))
    assert set(new) == set(old)
    folded = {k for k in old if k.endswith("mapping.weight")} if layout == "hub" else set()
    for key, value in old.items():
        if key in folded:  # a norm over n = in * kernel float32 products
            n = value[0].numel()
            assert rel_err(new[key].numpy(), value.numpy()) <= np.finfo(np.float32).eps * np.sqrt(n), key
        else:
            assert torch.equal(new[key], value), key

    config = mlx_t5.T5GemmaConfig.from_dir(source.text_encoder_dir())
    mapped = tb.load_torch_text_encoder(source, 16)
    resident_weights = text_encoder_weights(source, mlx_t5.T5GemmaEncoder(config))  # MLX arrays: a resident table
    resident = tb.TorchTextEncoder(config, resident_weights, mapped.tokenizer)
    assert isinstance(resident.model.encoder.embed_tokens, torch.nn.Embedding)
    for key, value in resident.model.state_dict().items():
        if "embed_tokens" not in key:
            assert torch.equal(mapped.model.state_dict()[key], value), key
    np.testing.assert_array_equal(np.asarray(mapped.encode(PROMPTS)[0]), np.asarray(resident.encode(PROMPTS)[0]))


def test_tensor_refs_answer_as_the_arrays_do():
    """What the sanitizers ask of a tensor (shape, transpose, reshape, astype, numpy) without reading it."""
    path = REF / "sa3_small_tiny_s0" / "model.safetensors"
    refs, arrays = loading.tensor_refs(path), mx.load(str(path))
    assert set(refs) == set(arrays)
    key = next(k for k, v in arrays.items() if v.ndim == 3)
    for ref, arr in ((refs[key], arrays[key]), (refs[key].transpose(0, 2, 1), arrays[key].transpose(0, 2, 1))):
        assert ref.shape == tuple(arr.shape) and ref.ndim == arr.ndim and ref.size == arr.size
        np.testing.assert_array_equal(np.asarray(ref), np.asarray(arr))
    flat = refs[key].reshape(-1).astype(mx.float16)
    assert flat.shape == (arrays[key].size,)
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(arrays[key].reshape(-1).astype(mx.float16)))


def test_converted_half_precision_loads_cast_to_float32(tmp_path):
    source = open_source(convert(CHECKPOINT, tmp_path / "c", dtype="float16"))
    dit = tb.load_torch_dit(source)
    assert all(p.dtype == torch.float32 for p in dit.net.parameters())
    stored = mx.load(str(source.root / source.meta["components"]["dit"]))
    weight = dit.net.proj_out.weight.numpy()
    np.testing.assert_array_equal(weight, np.asarray(stored["project_out.weight"].astype(mx.float32)))


def test_strict_check_names_a_missing_tensor_on_torch(tmp_path):
    from .test_convert import copy_fixture, rewrite_weights

    broken = copy_fixture("sa3_small_tiny_s0", tmp_path / "broken")
    rewrite_weights(broken, lambda t: t.pop("model.model.transformer.layers.0.self_attn.to_out.weight"))
    with pytest.raises(ValueError, match="DiT checkpoint does not match the model; missing 1"):
        tb.load_torch_dit(broken)


def _run(pipe):
    """Generate, recording which networks are resident per event kind and weak references to every network."""
    seen, networks = {}, []

    def callback(event):
        seen.setdefault(type(event).__name__, set()).update(pipe.model.loaded)
        for name in pipe.model.loaded:
            networks.append(weakref.ref(pipe.model._parts[name]))
        if isinstance(event, AudioEvent):
            seen["encoder_loaded"] = pipe.model.autoencoder.encoder_loaded
        return True

    out = pipe.generate("warm analog synth pad", duration=1.5, seed=3, steps=2, callback=callback)
    return out, seen, networks


def test_torch_one_shot_drops_each_network_after_its_stage():
    pipe = StableAudio3.from_pretrained(CHECKPOINT, backend="torch", keep_loaded=False)
    assert pipe.model.loaded == []
    out, seen, networks = _run(pipe)
    assert seen[StepEvent.__name__] == {"dit"} and seen[AudioEvent.__name__] == {"autoencoder"}
    assert seen["encoder_loaded"] is False  # text-to-audio never reads the SAME encoder
    assert pipe.model.loaded == []
    gc.collect()
    assert networks and all(ref() is None for ref in networks)  # released torch networks are freed
    kept = StableAudio3.from_pretrained(CHECKPOINT, backend="torch")
    reference, seen, _ = _run(kept)
    assert seen[StepEvent.__name__] == {"text_encoder", "dit", "autoencoder"}
    np.testing.assert_array_equal(out.audio, reference.audio)


def test_tensor_ref_weight_norm_is_recorded_not_computed():
    refs = loading.tensor_refs(REF / "sa3_small_tiny_s0" / "model.safetensors")
    g = next(k for k in refs if k.endswith("weight_g"))
    folded = loading.fold_weight_norm({g: refs[g], g[:-1] + "v": refs[g[:-1] + "v"]})
    (ref,) = folded.values()
    assert isinstance(ref, TensorRef) and ref.shape == refs[g[:-1] + "v"].shape
