"""The Gemma sentencepiece tokenizer of the T5Gemma text encoder, matching transformers' GemmaTokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..loading import CheckpointError, read_json

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _identity_normalizer(model_proto: bytes) -> bytes:
    """Return the sentencepiece model with its normalizer replaced by the identity.

    transformers' GemmaTokenizer ignores the sentencepiece normalizer: it only maps " " to "▁" (no NFKC, no
    whitespace folding, no dummy prefix). Gemma's own model already normalizes that way; a model trained with other
    settings (like the test fixtures') would otherwise tokenize differently from the official pipeline. The edit
    works on the protobuf wire format (ModelProto field 3 = NormalizerSpec) so that no protobuf runtime is needed.
    """
    kept, i = [], 0
    try:
        while i < len(model_proto):
            start = i
            key, i = _varint(model_proto, i)
            wire = key & 7
            if wire == 0:
                _, i = _varint(model_proto, i)
            elif wire == 1:
                i += 8
            elif wire == 2:
                length, i = _varint(model_proto, i)
                i += length
            elif wire == 5:
                i += 4
            else:
                raise CheckpointError(f"{TOKENIZER_FILE}: not a sentencepiece model (wire type {wire})")
            if key >> 3 != 3:
                kept.append(model_proto[start:i])
    except IndexError:  # a length or varint runs past the end of the file
        raise CheckpointError(f"{TOKENIZER_FILE}: truncated sentencepiece model") from None
    if i != len(model_proto):
        raise CheckpointError(f"{TOKENIZER_FILE}: truncated sentencepiece model")
    # NormalizerSpec{name: "identity", add_dummy_prefix: false, remove_extra_whitespaces: false}
    spec = b"\x0a\x08identity\x18\x00\x20\x00"
    return b"".join(kept) + b"\x1a" + bytes([len(spec)]) + spec


class T5GemmaTokenizer:
    """Gemma sentencepiece tokenizer that reproduces transformers' ``tokenizer(prompts, truncation=True,
    max_length=max_length, padding="max_length")`` as the official conditioner calls it."""

    def __init__(
        self,
        model_file,
        max_length: int,
        add_bos: bool = True,
        add_eos: bool = False,
        padding_side: str = "left",
        truncation_side: str = "right",
        special_tokens: tuple[str, ...] = (),
        pad_token: str = "<pad>",
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
    ):
        import sentencepiece as spm

        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ValueError("padding_side and truncation_side must be 'left' or 'right'")
        path = Path(model_file)
        if not path.exists():
            raise CheckpointError(f"{path}: missing")
        self.sp = spm.SentencePieceProcessor(model_proto=_identity_normalizer(path.read_bytes()))
        self.max_length = max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.pad_id = self._known_id(pad_token)
        self.prefix = [self._known_id(bos_token)] if add_bos else []
        self.suffix = [self._known_id(eos_token)] if add_eos else []
        if max_length <= len(self.prefix) + len(self.suffix):
            raise ValueError(f"max_length {max_length} leaves no room for text")
        # transformers matches special tokens in the raw text before normalizing and encodes them as one id;
        # sentencepiece never produces control pieces from text, so split them out first (longest first).
        specials = {p for p in special_tokens if self._in_vocab(p)}
        reserved = (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        specials |= {self.sp.id_to_piece(i) for i in reserved if i >= 0}  # -1: not defined by this model
        ordered = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None

    def _in_vocab(self, piece: str) -> bool:
        pid = self.sp.piece_to_id(piece)
        return not self.sp.is_unknown(pid) or piece == self.sp.id_to_piece(pid)

    def _known_id(self, piece: str) -> int:
        if not self._in_vocab(piece):
            raise CheckpointError(f"{TOKENIZER_FILE}: special token {piece!r} is not in the vocabulary")
        return self.sp.piece_to_id(piece)

    @classmethod
    def from_dir(cls, directory, max_length: int) -> "T5GemmaTokenizer":
        """Build from ``tokenizer.model`` + ``tokenizer_config.json``; absent flags take GemmaTokenizer's defaults."""
        directory = Path(directory)
        tc = read_json(directory / TOKENIZER_CONFIG_FILE)
        named = {k: v for k, v in tc.items() if k.endswith("_token") and isinstance(v, str)}
        added = [t["content"] for t in tc.get("added_tokens_decoder", {}).values() if "content" in t]
        extra = [t if isinstance(t, str) else t.get("content", "") for t in tc.get("additional_special_tokens", [])]
        return cls(
            directory / TOKENIZER_FILE,
            max_length,
            add_bos=tc.get("add_bos_token", True),
            add_eos=tc.get("add_eos_token", False),
            padding_side=tc.get("padding_side", "left"),
            truncation_side=tc.get("truncation_side", "right"),
            special_tokens=tuple(named.values()) + tuple(added) + tuple(extra),
            pad_token=named.get("pad_token", "<pad>"),
            bos_token=named.get("bos_token", "<bos>"),
            eos_token=named.get("eos_token", "<eos>"),
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of one prompt, without BOS/EOS, truncation or padding."""
        parts = self._special_re.split(text) if self._special_re else [text]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:  # re.split puts the matched separators at odd indices
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    @property
    def text_budget(self) -> int:
        """Tokens of prompt text that fit beside BOS/EOS in ``max_length``."""
        return self.max_length - len(self.prefix) - len(self.suffix)

    def overflow(self, prompts: list[str]) -> list[int]:
        """How many tokens of each prompt truncation drops (0 for a prompt that fits)."""
        return [max(0, len(self.tokenize(p)) - self.text_budget) for p in prompts]

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (input_ids int32 (B, max_length), attention_mask bool (B, max_length))."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(prompts), self.max_length), dtype=bool)
        budget = self.text_budget
        for row, prompt in enumerate(prompts):
            body = self.tokenize(prompt)
            body = body[:budget] if self.truncation_side == "right" else body[max(len(body) - budget, 0) :]
            tokens = self.prefix + body + self.suffix
            span = slice(0, len(tokens)) if self.padding_side == "right" else slice(self.max_length - len(tokens), None)
            ids[row, span] = tokens
            mask[row, span] = True
        return ids, mask
