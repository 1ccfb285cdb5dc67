"""LoRA adapters against the official fixtures (``*/lora/*.safetensors``, ``*/lora.npz``) on both backends.

lora.npz holds the official DiT outputs after ``load_and_apply_loras`` + ``set_lora_strength`` on the io.npz inputs:
``<case>.v_plain``, ``<case>.v_inpaint``, ``<case>.seconds_embedding`` and the strength(s). The tolerances are the
issue's: 1e-4 relative (float32 through the whole DiT, as the base parity tests), 1e-3 for the ``-xs`` types, whose
bases come from a float32 SVD recomputed here (singular vectors are only as accurate as the gaps between singular
values allow).
"""

import json
import re

import mlx_sa3
from mlx_sa3 import lora
from mlx_sa3.loading import CheckpointError, open_source

import mlx.core as mx
import numpy as np
import pytest

from .conftest import REF, rel_err

FIXTURES = ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"]
TOL = 1e-4
TOL_XS = 1e-3
# case -> LoRA files in load order (lora_r4_s05 reuses lora_r4 at strength 0.5; stack_lora_bora stacks two files)
CASES = {
    "lora_r4": ["lora_r4"],
    "lora_r4_s05": ["lora_r4"],
    "dora_rows_filtered": ["dora_rows_filtered"],
    "dora_cols": ["dora_cols"],
    "bora": ["bora"],
    "lora_xs": ["lora_xs"],
    "dora_rows_xs": ["dora_rows_xs"],
    "dora_cols_xs": ["dora_cols_xs"],
    "bora_xs": ["bora_xs"],
    "legacy_dora": ["legacy_dora"],
    "stack_lora_bora": ["lora_r4", "bora"],
}
OUTPUTS = ("v_plain", "v_inpaint", "seconds_embedding")


def lora_file(fixture: str, name: str):
    return REF / fixture / "lora" / f"{name}.safetensors"


def outputs(model, io) -> dict:
    """The three quantities lora.npz records, as numpy."""
    args = dict(cross_attn_cond=io["cross_attn_cond"], global_cond=io["global_cond"])
    return {
        "v_plain": np.array(model.dit(io["x"], io["t"], local_add_cond=np.zeros_like(io["local_add_cond"]), **args)),
        "v_inpaint": np.array(model.dit(io["x"], io["t"], local_add_cond=io["local_add_cond"], **args)),
        "seconds_embedding": np.array(model.encode_seconds(io["seconds"])),
    }


def strengths(ref, case) -> list:
    if f"{case}.strengths" in ref:
        return [float(s) for s in ref[f"{case}.strengths"]]
    return [float(ref[f"{case}.strength"])] * len(CASES[case])


def tolerance(case: str) -> float:
    return TOL_XS if case.endswith("_xs") else TOL


def assert_matches(got: dict, ref, case: str) -> None:
    errors = {k: rel_err(got[k], ref[f"{case}.{k}"]) for k in OUTPUTS}
    assert all(e <= tolerance(case) for e in errors.values()), f"{case}: {errors}"


@pytest.fixture(scope="module", params=[(f, b) for b in ("mlx", "torch") for f in FIXTURES], ids="-".join)
def loaded(request):
    fixture, backend = request.param
    if backend == "torch":
        pytest.importorskip("torch")
    model = mlx_sa3.load_model(REF / fixture, dtype="float32", backend=backend)
    io = dict(np.load(REF / fixture / "io.npz"))
    ref = dict(np.load(REF / fixture / "lora.npz"))
    return fixture, model, io, ref, outputs(model, io)


@pytest.fixture
def model_state(loaded):
    """The loaded model, with every LoRA removed again after the test."""
    yield loaded
    loaded[1].unload_lora()


# ------------------------------------------------------------------------------------------ official fixtures


@pytest.mark.parametrize("case", list(CASES))
def test_official_case(model_state, case):
    fixture, model, io, ref, base = model_state
    model.load_lora([lora_file(fixture, f) for f in CASES[case]])
    for index, strength in enumerate(strengths(ref, case)):  # as the fixture was made: set after loading
        model.set_lora_strength(strength, lora_index=index)
    got = outputs(model, io)
    assert_matches(got, ref, case)
    assert rel_err(got["v_plain"], base["v_plain"]) > 10 * tolerance(case)  # the LoRA really acts


def test_unload_restores_base_exactly(model_state):
    fixture, model, io, ref, base = model_state
    model.load_lora([lora_file(fixture, "lora_r4"), lora_file(fixture, "bora_xs")])
    model.unload_lora()
    assert model.loras == []
    got = outputs(model, io)
    for key in OUTPUTS:
        np.testing.assert_array_equal(got[key], base[key])


def test_strength_change_equals_loading_at_that_strength(model_state):
    fixture, model, io, ref, _ = model_state
    model.load_lora(lora_file(fixture, "lora_r4"))
    assert_matches(outputs(model, io), ref, "lora_r4")
    model.set_lora_strength(0.5)
    assert_matches(outputs(model, io), ref, "lora_r4_s05")
    model.set_lora_strength(1.0, lora_index=0)
    assert_matches(outputs(model, io), ref, "lora_r4")


def test_strength_given_at_load(model_state):
    fixture, model, io, ref, _ = model_state
    model.load_lora([lora_file(fixture, "lora_r4"), lora_file(fixture, "bora")], strength=[0.8, 0.4])
    assert_matches(outputs(model, io), ref, "stack_lora_bora")


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"alpha": "x"}, "lora_config alpha must be a number, got 'x'"),  # was float()'s message without the file
        ({"alpha": float("inf")}, "lora_config alpha must be finite"),
        ({"rank": 4.5}, "lora_config rank must be an integer, got 4.5"),  # was truncated to 4
    ],
)
def test_a_lora_config_with_impossible_numbers_names_the_file(model_state, tmp_path, edit, words):
    fixture, model, *_ = model_state
    tensors, metadata = mx.load(str(lora_file(fixture, "lora_r4")), return_metadata=True)
    path = tmp_path / "edited.safetensors"
    config = {**json.loads(metadata["lora_config"]), **edit}
    mx.save_safetensors(str(path), tensors, metadata={"lora_config": json.dumps(config)})
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {words}"):
        model.load_lora(path)
    assert model.loras == []


def test_a_strength_that_is_not_a_number_is_refused(model_state):
    fixture, model, *_ = model_state
    with pytest.raises(ValueError, match="a LoRA strength must be a number, got True"):
        model.load_lora(lora_file(fixture, "lora_r4"), strength=True)
    model.load_lora(lora_file(fixture, "lora_r4"))
    try:
        with pytest.raises(ValueError, match="a LoRA strength must be a number, got '0.5'"):
            model.set_lora_strength("0.5")
        assert [entry["strength"] for entry in model.loras] == [1.0]
    finally:
        model.unload_lora()


def test_controls_refuse_what_they_cannot_use(model_state):
    # NaN strengths or intervals ran (non-finite audio); a string index, a one-number interval or an int filter were
    # TypeError / IndexError / AttributeError from inside.
    fixture, model, *_ = model_state
    model.load_lora(lora_file(fixture, "lora_r4"))
    try:
        cases = [
            (lambda: model.set_lora_strength(float("nan")), "a LoRA strength must be finite"),
            (lambda: model.set_lora_strength(float("inf")), "a LoRA strength must be finite"),
            (lambda: model.set_lora_interval((float("nan"), 1.0)), "LoRA sigma interval"),
            (lambda: model.set_lora_interval((0.1,)), "LoRA sigma interval"),
            (lambda: model.set_lora_interval(("a", 1)), "LoRA sigma interval"),
            (lambda: model.set_lora_interval(5), "LoRA sigma interval"),
            (lambda: model.set_lora_strength(0.5, lora_index="0"), "lora_index must be an integer"),
            (lambda: model.set_lora_strength(0.5, lora_index=True), "lora_index must be an integer"),
            (lambda: model.set_lora_layer_filter(5), "layer_filter must be a string"),
        ]
        for call, words in cases:
            with pytest.raises(ValueError, match=words):
                call()
        (entry,) = model.loras
        assert entry["strength"] == 1.0 and entry["interval"] is None and entry["layer_filter"] == ""
        model.set_lora_interval([0.2, 0.8], lora_index=0)  # a list pair is an interval
        assert model.loras[0]["interval"] == (0.2, 0.8)
    finally:
        model.unload_lora()


def test_dora_strength_zero_is_off(model_state):
    """Official rule: DoRA/BoRA skip the adapter at strength 0 (renormalising with the trained magnitudes would
    otherwise change the weights even without a delta)."""
    fixture, model, io, _, base = model_state
    model.load_lora(lora_file(fixture, "bora"))
    model.set_lora_strength(0.0)
    got = outputs(model, io)
    for key in OUTPUTS:
        np.testing.assert_array_equal(got[key], base[key])


def test_unload_one_of_a_stack(model_state):
    fixture, model, io, ref, _ = model_state
    model.load_lora([lora_file(fixture, "lora_r4")])
    model.load_lora([lora_file(fixture, "bora")], strength=0.4)  # appended: index 1
    model.set_lora_strength(0.8, lora_index=0)
    assert [entry["name"] for entry in model.loras] == ["lora_r4", "bora"]
    assert [entry["strength"] for entry in model.loras] == [0.8, 0.4]
    assert_matches(outputs(model, io), ref, "stack_lora_bora")
    model.unload_lora(lora_index=1)
    model.set_lora_strength(1.0)
    assert_matches(outputs(model, io), ref, "lora_r4")


def test_listing(model_state):
    fixture, model, *_ = model_state
    model.load_lora(lora_file(fixture, "legacy_dora"), interval=(0.2, 0.9), layer_filter="to_global_embed")
    (entry,) = model.loras
    assert entry["index"] == 0 and entry["name"] == "legacy_dora"
    assert entry["adapter_type"] == "dora-rows"  # legacy "dora" with (fan_out, 1) magnitudes
    assert (entry["rank"], entry["alpha"], entry["strength"]) == (4, 4.0, 1.0)
    assert entry["interval"] == (0.2, 0.9) and entry["layer_filter"] == "to_global_embed"
    assert entry["layers"] == 40  # CASES.txt: 120 tensors, three per layer


# ------------------------------------------------------------------------------------------ runtime extras


def test_layer_filter_equals_file_without_those_layers(model_state, tmp_path):
    """Filtered layers stay unadapted: the same as a file that never had their tensors."""
    fixture, model, io, _, _ = model_state
    path = lora_file(fixture, "lora_r4")
    tensors, metadata = mx.load(str(path), return_metadata=True)
    kept = {k: v for k, v in tensors.items() if not any(p in k for p in ("transformer.layers.1.", "to_global_embed"))}
    stripped = tmp_path / "stripped.safetensors"
    mx.save_safetensors(str(stripped), kept, metadata=metadata)

    model.load_lora(stripped)
    expected = outputs(model, io)
    model.unload_lora()
    model.load_lora(path, layer_filter="transformer.layers.[1-1]., TO_GLOBAL_EMBED")  # lower-cased, ranges expanded
    got = outputs(model, io)
    for key in OUTPUTS:
        np.testing.assert_array_equal(got[key], expected[key])
    model.set_lora_layer_filter("")
    assert rel_err(outputs(model, io)["v_plain"], expected["v_plain"]) > 1e-3


def euler_by_hand(model, cond, noise, steps, active):
    """Euler sampling calling the DiT afresh at each step, with the LoRA's strength 1 where ``active(sigma)``."""
    sigmas = model.schedule(steps, length=noise.shape[-1])
    x = mx.array(noise)
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        model.set_lora_strength(1.0 if active(float(t)) else 0.0)
        v = model.dit(
            x, mx.full((x.shape[0],), float(t)), cond["cross_attn_cond"], cond["global_cond"], cond["local_add_cond"]
        )
        x = x + (float(t_next) - float(t)) * v
    return np.array(x)


def test_sigma_interval_switches_during_sampling(model_state):
    fixture, model, io, _, _ = model_state
    steps, length = 4, io["x"].shape[-1]
    noise = np.random.default_rng(0).standard_normal(io["x"].shape).astype(np.float32)
    model.load_lora(lora_file(fixture, "lora_r4"))
    cond = model.conditioning(["a dog barking", "rain"], [3.0, 5.0], length=length)  # LoRA on the seconds embedder
    sigmas = model.schedule(steps, length=length)
    lo, hi = float(sigmas[2]), float(sigmas[1])  # the LoRA acts on steps 2 and 3 only
    expected = euler_by_hand(model, cond, noise, steps, lambda s: lo <= s <= hi)
    always = euler_by_hand(model, cond, noise, steps, lambda s: True)

    model.set_lora_strength(1.0)
    model.set_lora_interval((lo, hi))
    got = np.array(model.sample(noise, cond, steps=steps, sampler="euler"))
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, always) > 1e-3


# ------------------------------------------------------------------------------------------ other layouts


def peft_copy(src, dst, with_config: bool):
    """The official file rewritten as a PEFT export (keys rooted at the whole SA3 model)."""
    tensors = mx.load(str(src))
    renamed = {}
    for key, value in tensors.items():
        module, _, param = key.rpartition(".parametrizations.weight.0.")
        root = "model.model." + module[len("model.") :] if module.startswith("model.") else "conditioner." + module
        if module.endswith("_conv"):  # PEFT keeps Conv1d adapters as convs: A (r, in, 1), B (out, r, 1)
            value = value[:, :, None]
        renamed[f"base_model.model.{root}.{param}.weight"] = value
    mx.save_safetensors(str(dst), renamed)
    if with_config:
        (dst.parent / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))


def test_peft_layout(model_state, tmp_path):
    fixture, model, io, ref, _ = model_state
    peft_copy(lora_file(fixture, "lora_r4"), tmp_path / "adapter_model.safetensors", with_config=True)
    model.load_lora(tmp_path / "adapter_model.safetensors")
    assert_matches(outputs(model, io), ref, "lora_r4")


def test_peft_without_config_uses_alpha_equal_rank(tmp_path):
    fixture = FIXTURES[0]
    peft_copy(lora_file(fixture, "lora_r4"), tmp_path / "adapter.safetensors", with_config=False)
    model = mlx_sa3.load_model(REF / fixture, dtype="float32")
    model.load_lora(tmp_path / "adapter.safetensors")
    (entry,) = model.loras
    assert (entry["rank"], entry["alpha"]) == (4, 4.0)  # official default when no alpha is recorded


def with_bases_file(fixture: str, tmp_path, flip: bool):
    """A copy of the fixture checkpoint whose model_config names an SVD bases file made here."""
    root = tmp_path / fixture
    root.mkdir(parents=True)
    for item in (REF / fixture).iterdir():
        if item.name != "model_config.json":
            (root / item.name).symlink_to(item)
    config = json.loads((REF / fixture / "model_config.json").read_text())
    config["svd_bases_path"] = "svd_bases.safetensors"
    (root / "model_config.json").write_text(json.dumps(config))
    tensors = mx.load(str(REF / fixture / "model.safetensors"))
    bases = {}
    sign = -1.0 if flip else 1.0
    for key, value in tensors.items():
        if value.ndim == 2 and key.endswith(".weight") and any(p in key for p in ("self_attn", "ff.ff", "seconds")):
            u, vh = lora.canonical_svd(np.array(value))
            bases[f"{key}.U"] = mx.array(sign * u)
            bases[f"{key}.V"] = mx.array(np.ascontiguousarray(vh.T))
    mx.save_safetensors(str(root / "svd_bases.safetensors"), bases)
    return root


def test_svd_bases_file_is_used(tmp_path):
    fixture = FIXTURES[0]
    ref = dict(np.load(REF / fixture / "lora.npz"))
    io = dict(np.load(REF / fixture / "io.npz"))
    path = lora_file(fixture, "bora_xs")  # adapts self_attn, ff and seconds_total: all covered by the file

    model = mlx_sa3.load_model(with_bases_file(fixture, tmp_path / "same", flip=False), dtype="float32")
    model.load_lora(path, strength=0.6)
    assert_matches(outputs(model, io), ref, "bora_xs")

    flipped = mlx_sa3.load_model(with_bases_file(fixture, tmp_path / "flipped", flip=True), dtype="float32")
    flipped.load_lora(path, strength=0.6)
    assert rel_err(outputs(flipped, io)["v_plain"], ref["bora_xs.v_plain"]) > 1e-2  # really read from the file


def test_pickle_svd_bases_refused(tmp_path):
    fixture = FIXTURES[0]
    root = with_bases_file(fixture, tmp_path, flip=False)
    config = json.loads((root / "model_config.json").read_text())
    config["svd_bases_path"] = "svd_bases.pt"
    (root / "model_config.json").write_text(json.dumps(config))
    (root / "svd_bases.pt").write_bytes(b"\x80\x04K\x01.")
    model = mlx_sa3.load_model(root, dtype="float32")
    with pytest.raises(CheckpointError, match=r"svd_bases\.pt: pickle"):
        model.load_lora(lora_file(fixture, "lora_xs"))


# ------------------------------------------------------------------------------------------ bad files


def rewrite(src, dst, edit=None, metadata_edit=None):
    tensors, metadata = mx.load(str(src), return_metadata=True)
    tensors = dict(tensors)
    if edit:
        edit(tensors)
    config = json.loads(metadata["lora_config"])
    if metadata_edit:
        metadata_edit(config)
    mx.save_safetensors(str(dst), tensors, metadata={"lora_config": json.dumps(config)})
    return dst


QKV_A = "model.transformer.layers.0.self_attn.to_qkv.parametrizations.weight.0.lora_A"


def _rename_to_missing_layer(t):
    for param in ("lora_A", "lora_B"):
        t[f"model.transformer.layers.9.self_attn.to_qkv.parametrizations.weight.0.{param}"] = t.pop(
            QKV_A.replace("lora_A", param)
        )


def _narrow(t):
    t[QKV_A] = t[QKV_A][:, :-1]


BAD = {
    "missing_layer": (_rename_to_missing_layer, None, "layers.9.self_attn.to_qkv"),
    "wrong_shape": (_narrow, None, QKV_A),
    "wrong_rank": (None, lambda c: c.update(rank=8), "lora_A"),
    "norm_gain": (
        lambda t: t.update(
            {
                "model.transformer.layers.0.pre_norm.parametrizations.weight.0.lora_A": mx.zeros((4, 96), mx.float16),
                "model.transformer.layers.0.pre_norm.parametrizations.weight.0.lora_B": mx.zeros((96, 4), mx.float16),
            }
        ),
        None,
        "pre_norm",
    ),
    "not_lora": (
        lambda t: t.update({"model.transformer.layers.0.self_attn.to_qkv.weight": mx.zeros((4,))}),
        None,
        "self_attn.to_qkv.weight is not a LoRA tensor",
    ),
    "unknown_type": (None, lambda c: c.update(adapter_type="vera"), "unknown adapter_type"),
    "missing_magnitude": (
        lambda t: t.pop(QKV_A.replace("lora_A", "magnitude")),
        lambda c: c.update(adapter_type="dora-rows"),
        "magnitude",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_refused_naming_file_and_tensor(loaded, tmp_path, case):
    fixture, model, io, _, base = loaded
    edit, metadata_edit, tensor = BAD[case]
    source = "legacy_dora" if case == "missing_magnitude" else "lora_r4"
    bad = rewrite(lora_file(fixture, source), tmp_path / f"{case}.safetensors", edit, metadata_edit)
    good = lora_file(fixture, "bora")
    with pytest.raises(CheckpointError) as err:
        model.load_lora([good, bad])  # the good first file must not be applied either
    assert str(bad) in str(err.value) and tensor in str(err.value)
    assert model.loras == []
    np.testing.assert_array_equal(outputs(model, io)["v_plain"], base["v_plain"])


def test_medium_lora_on_small_model_refused(loaded):
    fixture, model, *_ = loaded
    other = FIXTURES[1 - FIXTURES.index(fixture)]
    path = lora_file(other, "lora_r4")
    with pytest.raises(CheckpointError) as err:
        model.load_lora(path)
    message = str(err.value)
    assert str(path) in message and "cross_attn.to_kv.parametrizations.weight.0.lora_B has shape" in message


def test_pickle_lora_refused(loaded, tmp_path):
    model = loaded[1]
    path = tmp_path / "style.ckpt"
    path.write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1: must never be unpickled
    with pytest.raises(CheckpointError, match=r"style\.ckpt: pickle LoRA checkpoints are refused"):
        model.load_lora(path)


def test_truncated_file_refused(loaded, tmp_path):
    fixture, model, *_ = loaded
    data = lora_file(fixture, "lora_r4").read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        model.load_lora(path)
    message = str(err.value)
    assert str(path) in message and "parametrizations.weight.0.lora_" in message  # MLX names the cut tensor
    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(data[:40])
    with pytest.raises(CheckpointError, match="header.safetensors: not a readable safetensors file"):
        model.load_lora(header_only)


def test_missing_file_refused(loaded, tmp_path):
    with pytest.raises(CheckpointError, match="no such LoRA file"):
        loaded[1].load_lora(tmp_path / "absent.safetensors")


# ------------------------------------------------------------------------------------------ export and pipeline


@pytest.mark.parametrize("fixture", FIXTURES)
def test_merged_weights_reproduce_lora_outputs(fixture):
    """What the converter bakes in: loaded without any LoRA, the merged weights give the stacked LoRA outputs."""
    from mlx_sa3.dit import DiT, DiTConfig
    from mlx_sa3.model import Conditioners, SA3Config

    from mlx.utils import tree_flatten

    source = open_source(REF / fixture)
    base_model = mlx_sa3.load_model(source, dtype="float32")
    ref = dict(np.load(REF / fixture / "lora.npz"))
    io = dict(np.load(REF / fixture / "io.npz"))
    pairs = [(lora_file(fixture, "lora_r4"), 0.8), (lora_file(fixture, "bora"), 0.4)]
    dit_weights, cond_tensors, record = lora.merge_loras(
        dict(tree_flatten(base_model.dit.parameters())), base_model.conditioners.tensors, pairs
    )
    assert [(r["file"], r["strength"], r["adapter_type"]) for r in record] == [
        ("lora_r4.safetensors", 0.8, "lora"),
        ("bora.safetensors", 0.4, "bora"),
    ]
    assert all(len(r["sha256"]) == 64 for r in record)

    dit = DiT(DiTConfig.from_model_config(source.model_config))
    dit.load_weights(list(dit_weights.items()))
    merged = mlx_sa3.SA3Model(
        base_model.config, dit, None, None, Conditioners(cond_tensors, SA3Config.from_dict(source.model_config))
    )
    assert_matches(outputs(merged, io), ref, "stack_lora_bora")
    # the inputs were not modified
    name = "seconds_total.embedder.embedding.1.weight"
    np.testing.assert_array_equal(
        np.array(base_model.conditioners.tensors[name]), np.array(source.component("conditioners")[name])
    )


def test_from_pretrained_with_loras():
    fixture = FIXTURES[0]
    ref = dict(np.load(REF / fixture / "lora.npz"))
    io = dict(np.load(REF / fixture / "io.npz"))
    pipe = mlx_sa3.StableAudio3.from_pretrained(
        REF / fixture, dtype="float32", loras=[(lora_file(fixture, "lora_r4"), 0.8), (lora_file(fixture, "bora"), 0.4)]
    )
    assert [(e["name"], e["strength"]) for e in pipe.model.loras] == [("lora_r4", 0.8), ("bora", 0.4)]
    assert_matches(outputs(pipe.model, io), ref, "stack_lora_bora")


def test_controls_without_loras(loaded):
    model = loaded[1]
    model.set_lora_strength(0.5)  # nothing loaded: nothing to do, as the official set_lora_strength
    model.unload_lora()
    assert model.loras == []
    with pytest.raises(IndexError, match="lora_index 0 out of range"):
        model.set_lora_strength(0.5, lora_index=0)


def test_quantized_dit_refused():
    """Merged LoRAs need float base weights: a DiT with quantized layers is refused before anything changes."""
    import mlx.nn as nn

    fixture = FIXTURES[0]
    model = mlx_sa3.load_model(REF / fixture, dtype="float32")
    nn.quantize(
        model.dit,
        group_size=32,
        bits=8,
        class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0,
    )
    with pytest.raises(ValueError, match="LoRA on a quantized DiT"):
        model.load_lora(lora_file(fixture, "lora_r4"))
    assert model.loras == []


def test_pickle_under_safetensors_name_refused(loaded, tmp_path):
    path = tmp_path / "style.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)  # a torch.save zip archive renamed
    with pytest.raises(CheckpointError, match=r"style\.safetensors: a pickle \(torch\.save\) file, refused"):
        loaded[1].load_lora(path)
