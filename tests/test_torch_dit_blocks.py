"""The torch DiT's own block forward (``torch_backend.dit._block``) against diffusers' ``StableAudio3DiTBlock``
forwards run as they are (``TorchDiT._reference_velocity``), and the oneDNN GEMM / thread settings it runs under.

Both compute the same float32 maths in a different order (prepared keys/values, fused norm + RoPE, in-place
residuals, oneDNN instead of the BLAS, row padding), so they agree to the rounding of two float32 evaluations of the
stack: ``conftest.stack_tol``.
"""

from mlx_sa3 import platform
from mlx_sa3.dit import DiT, DiTConfig

import mlx.core as mx
import numpy as np
import pytest

from .conftest import REF, fp32_tol, rel_err, stack_tol

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from mlx_sa3.torch_backend import common, load_torch_dit, torch_dit_from_mlx  # noqa: E402
from mlx_sa3.torch_backend import dit as tdit  # noqa: E402

FIXTURES = ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"]


def random_dit(differential: bool, seed: int = 0):
    """A tiny DiT with head_dim 64, so RoPE rotates 32 of the 64 channels (the fixtures' head_dim 32 rotates all)."""
    config = DiTConfig(
        io_channels=8,
        embed_dim=128,
        depth=2,
        num_heads=2,
        cond_token_dim=48,
        global_cond_dim=40,
        local_add_cond_dim=9,
        num_memory_tokens=5,
        differential=differential,
    )
    mx.random.seed(seed)
    model = DiT(config)
    model.memory_tokens = mx.random.normal(model.memory_tokens.shape)
    for layer in model.layers:
        layer.to_scale_shift_gate = 0.5 * mx.random.normal(layer.to_scale_shift_gate.shape)
    return torch_dit_from_mlx(model)


def inputs(config, batch: int, length: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, config.io_channels, length)).astype(np.float32),
        "cross_attn_cond": rng.standard_normal((batch, 7, config.cond_token_dim)).astype(np.float32),
        "global_cond": rng.standard_normal((batch, config.global_cond_dim)).astype(np.float32),
        "local_add_cond": rng.standard_normal((batch, config.local_add_cond_dim, length)).astype(np.float32),
        "t": np.array([0.3, 0.8][:batch], np.float32),
    }


def both(model, io, guided: bool, **prepare):
    prepared = model.prepare(io["cross_attn_cond"], io["global_cond"], **prepare)
    x, t = mx.array(io["x"]), mx.array(io["t"])
    return (
        np.array(model._velocity(x, t, prepared, guided)),
        np.array(model._reference_velocity(x, t, prepared, guided)),
    )


CASES = {
    "plain": (False, {}),
    "inpaint": (False, {"local_add_cond": "local"}),
    "zero_local": (False, {"local_add_cond": "zeros"}),
    "cfg_null_context": (True, {"cfg": True}),
    "cfg_negative_prompt": (True, {"cfg": True, "negative_cross_attn_cond": "negative"}),
}


def prepare_kwargs(kwargs: dict, io: dict) -> dict:
    values = {
        "local": io["local_add_cond"],
        "zeros": np.zeros_like(io["local_add_cond"]),
        "negative": np.ascontiguousarray(io["cross_attn_cond"][::-1]),
    }
    return {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}


@pytest.fixture(scope="module", params=FIXTURES)
def fixture_dit(request):
    return load_torch_dit(REF / request.param), dict(np.load(REF / request.param / "io.npz"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocks_match_diffusers_on_fixtures(fixture_dit, case):
    model, io = fixture_dit
    guided, kwargs = CASES[case]
    ours, theirs = both(model, io, guided, **prepare_kwargs(kwargs, io))
    assert ours.shape == theirs.shape == ((2 if guided else 1) * io["x"].shape[0], *io["x"].shape[1:])
    assert rel_err(ours, theirs) <= stack_tol(model.config.embed_dim, model.config.depth)


@pytest.mark.parametrize("differential", [False, True])
@pytest.mark.parametrize("length", [11, 16 * 3 - 5])  # 16 tokens: a padded run; 48: one without row padding
@pytest.mark.parametrize("case", ["plain", "inpaint", "cfg_negative_prompt"])
def test_blocks_match_diffusers_with_partial_rope(differential, length, case):
    model = random_dit(differential)
    io = inputs(model.config, batch=2, length=length)
    guided, kwargs = CASES[case]
    ours, theirs = both(model, io, guided, **prepare_kwargs(kwargs, io))
    assert rel_err(ours, theirs) <= stack_tol(model.config.embed_dim, model.config.depth)


def test_step_does_not_recompute_step_invariant_work():
    """The cross-attention keys/values and the local terms come from prepare, not from every block of every step."""
    model = random_dit(differential=True)
    io = inputs(model.config, batch=1, length=9)
    prepared = model.prepare(io["cross_attn_cond"], io["global_cond"], io["local_add_cond"])
    calls = []
    hooks = [
        module.register_forward_hook(lambda *_: calls.append(1))
        for block in model.net.transformer_blocks
        for module in (block.to_local_embed, block.cross_attn.to_kv)
    ]
    try:
        model.step(io["x"], io["t"], prepared)
        assert calls == []
        model._reference_velocity(mx.array(io["x"]), mx.array(io["t"]), prepared, False)
        assert len(calls) == 2 * model.config.depth  # the hooks do see diffusers' per-step recomputation
    finally:
        for hook in hooks:
            hook.remove()


def test_onednn_linear_matches_torch_linear():
    linear = common.onednn_linear()
    if linear is None:
        pytest.skip("this torch has no oneDNN linear")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, 256, generator=gen)
    weight, bias = torch.randn(96, 256, generator=gen), torch.randn(96, generator=gen)
    for args in ((x, weight, bias), (x, weight, None), (x.transpose(1, 2).contiguous().transpose(1, 2), weight, bias)):
        want = torch.nn.functional.linear(*args)
        assert rel_err(linear(*args).numpy(), want.numpy()) <= fp32_tol(256)


def test_onednn_linear_bfloat16_matches_torch_linear_or_is_absent():
    """oneDNN's bfloat16 inner product needs AVX-512 on x86: where the CPU lacks it the probe must say None (the
    step then uses torch's own linear), never hand out an op that raises mid-generation."""
    linear = common.onednn_linear(torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 37, 256, generator=gen).bfloat16()
    weight, bias = torch.randn(96, 256, generator=gen).bfloat16(), torch.randn(96, generator=gen).bfloat16()
    want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    if linear is None:  # torch's own bfloat16 linear must then run here
        got = torch.nn.functional.linear(x, weight, bias)
    else:
        got = linear(x, weight, bias)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float().numpy(), want.numpy()) <= 2 * torch.finfo(torch.bfloat16).eps


def test_onednn_linear_is_none_where_the_op_raises(monkeypatch):
    def refuses(*args):
        raise RuntimeError("could not create a primitive descriptor for the inner product forward propagation")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", refuses)
    common._onednn_linear.cache_clear()
    try:
        assert common.onednn_linear(torch.bfloat16) is None
        assert common.onednn_linear(torch.float32) is None
    finally:
        monkeypatch.undo()
        common._onednn_linear.cache_clear()
    assert (common.onednn_linear() is None) == (common.onednn_linear(torch.float32) is None)


def test_onednn_threads_give_torch_its_threads_and_openblas_one():
    torch_before = common.require_torch().get_num_threads()
    blas = platform._openblas()
    blas_before = blas.openblas_get_num_threads() if blas else None
    with common.onednn_threads():
        assert torch.get_num_threads() == platform.torch_default_threads
        if blas:
            assert blas.openblas_get_num_threads() == 1
    assert torch.get_num_threads() == torch_before
    assert (blas.openblas_get_num_threads() if blas else None) == blas_before


def test_step_runs_under_onednn_threads(monkeypatch):
    if common.onednn_linear() is None:
        pytest.skip("this torch has no oneDNN linear")
    seen = []
    real = tdit.linear

    def spy(x, layer):
        seen.append(torch.get_num_threads())
        return real(x, layer)

    monkeypatch.setattr(tdit, "linear", spy)
    monkeypatch.setattr(common, "linear", spy)  # the feed-forward's (common.glu_feed_forward)
    model = random_dit(differential=False)
    io = inputs(model.config, batch=1, length=4)
    model(io["x"], io["t"], io["cross_attn_cond"], io["global_cond"])
    assert seen and set(seen) == {platform.torch_default_threads}
