import json
import random
import re
import shutil

from mlx_sa3.loading import CheckpointError, load_safetensors, open_source
from mlx_sa3.t5gemma import (
    T5GemmaConfig,
    T5GemmaEncoder,
    T5GemmaTokenizer,
    load_text_encoder,
    load_weights,
    sanitize,
)
from mlx_sa3.t5gemma import dropped as dropped_keys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tests.conftest import half_tol, rel_err

FIXTURES = ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"]
PROMPTS = [
    "epic orchestral buildup with tribal drums",
    "",
    "héllo  wörld 🎵 日本語, ﬁne ① \u00a0nbsp",
    "  leading and trailing spaces \n\ttabs ",
    "ambient pad " * 30,  # far longer than max_length: truncated
    "special </s> and <pad> and <unk> tokens",
]


def prompt_max_length(source) -> int:
    configs = source.model_config["model"]["conditioning"]["configs"]
    return next(c for c in configs if c["id"] == "prompt")["config"]["max_length"]


@pytest.fixture(scope="module")
def small(ref_dir):
    source = open_source(ref_dir / FIXTURES[0])
    return source, prompt_max_length(source)


@pytest.fixture(scope="module")
def fp32_encoder(small):
    source, max_length = small
    return load_text_encoder(source.text_encoder_dir(), max_length)


def hf_tokenize(directory, prompts, max_length):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    enc = tok(prompts, truncation=True, max_length=max_length, padding="max_length", return_tensors="np")
    return enc["input_ids"], enc["attention_mask"].astype(bool)


def hf_encode(directory, ids, mask):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, T5GemmaEncoderModel

    config = AutoConfig.from_pretrained(str(directory))
    config.is_encoder_decoder = False  # what the official conditioner does
    model = T5GemmaEncoderModel.from_pretrained(str(directory), config=config).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
    return out.last_hidden_state.numpy()


def random_prompts(n, seed=0):
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz       \n\t.,!?-'\"0123456789ABCéüß日本🎵ﬁ①\u00a0"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def test_config_from_dict(small):
    source, _ = small
    raw = json.loads((source.text_encoder_dir() / "config.json").read_text())
    cfg = T5GemmaConfig.from_dict(raw)
    enc = raw["encoder"]
    assert cfg.hidden_size == enc["hidden_size"] and cfg.num_hidden_layers == enc["num_hidden_layers"]
    assert cfg.num_key_value_heads == enc["num_key_value_heads"] and cfg.head_dim == enc["head_dim"]
    assert cfg.intermediate_size == enc["intermediate_size"] and cfg.vocab_size == enc["vocab_size"]
    assert cfg.rope_theta == enc["rope_parameters"]["rope_theta"]
    assert cfg.attn_logit_softcapping == enc["attn_logit_softcapping"]
    assert cfg.layer_types == enc["layer_types"]
    # Older (transformers 4) configs keep rope_theta at the top of the section; unknown keys are ignored.
    legacy = {k: v for k, v in enc.items() if k != "rope_parameters"} | {"rope_theta": 1234.0, "novel_key": 1}
    assert T5GemmaConfig.from_dict(legacy).rope_theta == 1234.0


def test_tokenizer_matches_transformers(small):
    source, max_length = small
    directory = source.text_encoder_dir()
    prompts = PROMPTS + random_prompts(200)
    ids, mask = T5GemmaTokenizer.from_dir(directory, max_length)(prompts)
    ref_ids, ref_mask = hf_tokenize(directory, prompts, max_length)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(prompts), max_length)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert not mask[1].any(), "empty prompt must be fully padded"
    assert mask[4].all(), "long prompt must be truncated to max_length"


def test_tokenizer_honours_config_flags(small, tmp_path):
    """Left padding/truncation and BOS/EOS, as transformers applies them from tokenizer_config.json."""
    source, _ = small
    shutil.copy(source.text_encoder_dir() / "tokenizer.model", tmp_path)
    flags = {
        "tokenizer_class": "GemmaTokenizer",
        "padding_side": "left",
        "truncation_side": "left",
        "add_bos_token": True,
        "add_eos_token": True,
        "pad_token": "<pad>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(flags))
    ids, mask = T5GemmaTokenizer.from_dir(tmp_path, 12)(PROMPTS)
    ref_ids, ref_mask = hf_tokenize(tmp_path, PROMPTS, 12)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


def test_encoder_matches_transformers(small, fp32_encoder):
    source, max_length = small
    hidden, mask = fp32_encoder.encode(PROMPTS)
    ids, _ = fp32_encoder.tokenizer(PROMPTS)
    ref = hf_encode(source.text_encoder_dir(), ids, np.array(mask))
    hidden, mask = np.array(hidden), np.array(mask)
    assert hidden.dtype == np.float32 and hidden.shape == ref.shape
    assert np.isfinite(hidden).all(), "the all-padding (empty) prompt must not produce NaN"
    assert rel_err(hidden[mask], ref[mask]) <= 1e-4


def variant_dir(directory, out, sliding_window=None, qk_gain=1.0):
    """Copy of the fixture encoder with a narrower sliding window and/or larger q/k weights."""
    from safetensors.numpy import load_file, save_file

    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(directory / name, out)
    config = json.loads((directory / "config.json").read_text())
    if sliding_window is not None:
        for section in ("encoder", "decoder"):
            config[section]["sliding_window"] = sliding_window
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(directory / "model.safetensors")
    for key in tensors:
        if re.search(r"self_attn\.[qk]_proj\.weight$", key):
            tensors[key] = tensors[key] * np.float32(qk_gain)
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize(
    "variant, what",
    [
        ({"sliding_window": 3}, "a window shorter than the sequence (|i - j| <= window band)"),
        ({"qk_gain": 8.0}, "attention logits large enough for the tanh soft-capping to matter"),
    ],
)
def test_encoder_variants_match_transformers(small, tmp_path, variant, what):
    source, max_length = small
    directory = variant_dir(source.text_encoder_dir(), tmp_path, **variant)
    encoder = load_text_encoder(directory, max_length)
    hidden, mask = encoder.encode(PROMPTS[:1])
    ids, _ = encoder.tokenizer(PROMPTS[:1])
    mask = np.array(mask)
    ref = hf_encode(directory, ids, mask)
    assert rel_err(np.array(hidden)[mask], ref[mask]) <= 1e-4, what


def test_softcap_and_window_are_exercised(small, tmp_path):
    """Guard for the test above: each variant really changes the output (else it could not catch a bug)."""
    source, max_length = small
    base = np.array(load_text_encoder(source.text_encoder_dir(), max_length).encode(PROMPTS[:1])[0])
    window = variant_dir(source.text_encoder_dir(), tmp_path, sliding_window=3)
    assert rel_err(np.array(load_text_encoder(window, max_length).encode(PROMPTS[:1])[0]), base) > 1e-3
    encoder = load_text_encoder(variant_dir(source.text_encoder_dir(), tmp_path, qk_gain=8.0), max_length)
    capped = np.array(encoder.encode(PROMPTS[:1])[0])
    for attn in (layer.self_attn for layer in encoder.model.layers):
        attn.softcap = None
    uncapped = np.array(encoder.encode(PROMPTS[:1])[0])
    assert rel_err(uncapped, capped) > 1e-3


@pytest.mark.parametrize("fixture", FIXTURES)
def test_official_conditioner_output(ref_dir, fixture):
    source = open_source(ref_dir / fixture)
    golden = np.load(ref_dir / fixture / "pipeline.npz")
    padding = source.component("conditioners")["prompt.padding_embedding"]
    encoder = load_text_encoder(source.text_encoder_dir(), prompt_max_length(source))
    hidden, mask = encoder.encode([str(p) for p in golden["prompts"]])
    emb = mx.where(mask[..., None], hidden, padding)
    np.testing.assert_array_equal(np.array(mask), golden["prompt_mask"].astype(bool))
    assert rel_err(np.array(emb), golden["prompt_embedding"]) <= 1e-4


def test_fused_kernel_path_matches_transformers(small, tmp_path, monkeypatch):
    """The GPU path (MLX's GELU, tanh soft-capping and softmax, not the CPU kernels) also matches transformers, with
    the soft-capping and the window band in play."""
    from mlx_sa3.models import kernels

    monkeypatch.setattr(kernels, "_use_fused_kernels", lambda: True)
    source, max_length = small
    directory = variant_dir(source.text_encoder_dir(), tmp_path, sliding_window=3, qk_gain=8.0)
    encoder = load_text_encoder(directory, max_length)
    hidden, mask = encoder.encode(PROMPTS)
    ids, _ = encoder.tokenizer(PROMPTS)
    mask = np.array(mask)
    ref = hf_encode(directory, ids, mask)
    assert np.isfinite(np.array(hidden)).all() and rel_err(np.array(hidden)[mask], ref[mask]) <= 1e-4


@pytest.mark.parametrize("dtype, tol", [(mx.float16, half_tol(mx.float16)), (mx.bfloat16, half_tol(mx.bfloat16))])
def test_half_precision(small, fp32_encoder, dtype, tol):
    source, max_length = small
    encoder = load_text_encoder(source.text_encoder_dir(), max_length, dtype=dtype)
    assert all(v.dtype == dtype for _, v in nn.utils.tree_flatten(encoder.model.parameters()))
    hidden, mask = encoder.encode(PROMPTS)
    ref, _ = fp32_encoder.encode(PROMPTS)
    assert hidden.dtype == mx.float32
    mask = np.array(mask)
    err = rel_err(np.array(hidden)[mask], np.array(ref)[mask])
    assert 0 < err <= tol  # > 0: the computation really ran in half precision


def test_sanitize_and_strict_loading(small):
    source, max_length = small
    raw = load_safetensors(source.text_encoder_dir() / "model.safetensors")
    weights, dropped = sanitize(raw), dropped_keys(raw)
    assert dropped and all(k.startswith("decoder.") for k in dropped)
    assert len(weights) + len(dropped) == len(raw)
    assert "embed_tokens.weight" in weights and "layers.0.self_attn.q_proj.weight" in weights

    config = T5GemmaConfig.from_dir(source.text_encoder_dir())
    missing = dict(weights)
    del missing["layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        load_weights(T5GemmaEncoder(config), missing)

    wrong = dict(weights)
    wrong["norm.weight"] = mx.zeros((config.hidden_size + 1,))
    with pytest.raises(CheckpointError, match=r"norm\.weight"):
        load_weights(T5GemmaEncoder(config), wrong)

    unexpected = dict(weights) | {"decoder.norm.weight": weights["norm.weight"]}
    with pytest.raises(CheckpointError, match=r"decoder\.norm\.weight"):
        load_weights(T5GemmaEncoder(config), unexpected)

    # Already-sanitized weights (converted layout) load as they are.
    encoder = load_text_encoder(source.text_encoder_dir(), max_length, weights=weights)
    assert np.isfinite(np.array(encoder.encode(PROMPTS[:1])[0])).all()
