"""Per-item batches: one call, items with their own prompt, duration, seed and negative prompt.

Every item is planned exactly as if it were generated alone (``StableAudio3.plan`` with batch size 1), so its noise,
its ping-pong step noise, its length and its duration conditioning come from its own settings only: adding an item to
a batch never changes the others, and each item equals the same item generated alone up to float rounding.

Items whose DiT inputs have the same shape and schedule share one DiT batch; items of other lengths run as separate
batches, one after the other ("grouping by length"). Sharing one batch across lengths needs attention masking of the
padded keys in the DiT, and pays only where a padded batch costs less than its items alone; on the CPU it does not
(docs/BATCH.md has the numbers and the DiT change masking would need; benchmarks/bench_batch.py --dit-only).

A per-item request is an ordinary :class:`~mlx_sa3.pipeline.GenerationRequest` whose ``prompt``, ``duration``,
``seed`` or ``negative_prompt`` is a list; each item becomes a solo request (:func:`expand_items`). This module only
uses the pipeline's public building blocks (``plan``, ``model.conditioning``, ``model.sample_iter``,
``model.autoencoder.decode_stream``), so it works on both backends; :class:`~mlx_sa3.pipeline.StableAudio3`
dispatches here when a request is per item (:func:`is_per_item`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from .outputs import resolve_seed
from .sampling import NonFiniteError, gaussian_noise


@dataclass
class ItemPlan:
    """One item of a per-item request: its solo plan and the seed its step noise comes from."""

    index: int
    plan: object  # pipeline.Plan for batch size 1
    seed: int


def _listed(value) -> bool:
    return isinstance(value, (list, tuple))


def is_per_item(request) -> bool:
    """True when a :class:`~mlx_sa3.pipeline.GenerationRequest` asks for per-item settings rather than
    ``batch_size`` variations of one setting.

    A list of durations or seeds is per item; so is a list of several prompts (or of negative prompts) with
    ``batch_size`` 1. A list of prompts with a matching ``batch_size`` and single settings keeps the shared-seed batch.
    """
    r = request
    if _listed(r.duration) or _listed(r.seed):
        return True
    if _listed(r.negative_prompt) and int(r.batch_size) == 1 and len(r.negative_prompt) > 1:
        return True
    return _listed(r.prompt) and int(r.batch_size) == 1 and len(r.prompt) > 1


def item_count(request) -> int:
    """The number of items: the number of prompts when they are a list, else the longest list given."""
    if _listed(request.prompt):
        return len(request.prompt)
    counts = [len(v) for v in (request.duration, request.seed, request.negative_prompt) if _listed(v)]
    return max(counts, default=1)


def _per_item(value, count: int, what: str) -> list:
    if _listed(value):
        if len(value) != count:
            raise ValueError(f"got {len(value)} {what} for {count} items")
        return list(value)
    return [value] * count


def expand_items(request) -> list:
    """One solo request (batch size 1) per item; a single value applies to every item.

    ``seed=None`` draws one random seed per item, so every item's seed is known (``out.seeds``).
    """
    count = item_count(request)
    if count == 0:
        raise ValueError(
            "a per-item request has at least one item: its prompt, duration, seed or negative_prompt list is empty"
        )
    if int(request.batch_size) not in (1, count):
        raise ValueError(f"batch size {request.batch_size} does not match the {count} items of a per-item request")
    if request.noise is not None:
        raise ValueError("noise cannot be given for a per-item request: each item's noise comes from its seed")
    prompts = _per_item(request.prompt, count, "prompts")
    durations = _per_item(request.duration, count, "durations")
    seeds = [resolve_seed(s) for s in _per_item(request.seed, count, "seeds")]  # None or negative: random
    negatives = _per_item(request.negative_prompt, count, "negative prompts")
    return [
        replace(request, prompt=p, duration=d, seed=s, negative_prompt=n, batch_size=1)
        for p, d, s, n in zip(prompts, durations, seeds, negatives)
    ]


def plan_items(pipe, request) -> list[ItemPlan]:
    """Validate every item by planning it alone; raises ValueError naming the first bad item.

    A warning the items share (a negative prompt without guidance, cfg on a distilled checkpoint) is given once.
    """
    items, remarks = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, solo in enumerate(expand_items(request)):
            try:
                plan = pipe.plan(request=solo)
            except ValueError as err:
                raise ValueError(f"item {i + 1}: {err}") from None
            items.append(ItemPlan(i, plan, solo.seed))
    for remark in caught:
        if (str(remark.message), remark.category) not in remarks:
            remarks.append((str(remark.message), remark.category))
    for message, category in remarks:
        warnings.warn(message, category, stacklevel=3)
    return items


def batch_key(plan) -> tuple:
    """What items must share to run in one DiT batch: tensor shapes, the schedule and the guidance settings.

    Inpainting and plain items mix freely (no mask is the same DiT input as an all-zero mask). With attention masking
    of padded keys in the DiT, ``length`` would leave this key (see docs/BATCH.md).
    """
    init = plan.init_noise_level if plan.init_latents is not None else None
    return (
        plan.length,
        plan.schedule_length,
        plan.steps,
        plan.sampler,
        plan.cfg_scale,
        plan.apg_scale,
        init,
        plan.negative_prompts is not None,
    )


def group_items(items: list[ItemPlan], max_batch: int | None = None, key: Callable = batch_key) -> list[list[ItemPlan]]:
    """Items grouped by ``key`` in order of first appearance, each group cut into batches of at most ``max_batch``."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item.plan), []).append(item)
    size = max_batch or max(len(items), 1)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


def _stack_noise_fn(seeds: list[int]) -> Callable:
    """Ping-pong step noise drawn per item from the item's own step key, exactly as a solo run draws it."""
    draws = [gaussian_noise(mx.random.split(mx.random.key(s))[1]) for s in seeds]

    def draw(index: int, shape: tuple) -> mx.array:
        return mx.concatenate([d(index, (1, *shape[1:])) for d in draws], axis=0)

    return draw


def _cat(arrays: list):
    return None if arrays[0] is None else mx.concatenate(arrays, axis=0)


def _inpaint_inputs(plans: list, channels: int):
    """Per-item masks and known latents; items without inpainting get an all-zero mask (generate everything)."""
    if all(p.inpaint_mask is None for p in plans):
        return None, None
    masks, known = [], []
    for p in plans:
        if p.inpaint_mask is None:
            masks.append(mx.zeros((1, 1, p.length)))
            known.append(mx.zeros((1, channels, p.length)))
        else:
            masks.append(p.inpaint_mask)
            known.append(p.inpaint_known[:1])
    return mx.concatenate(masks, axis=0), mx.concatenate(known, axis=0)


def stream_items(
    pipe, request, *, chunk_latents: int | None = None, callback=None, max_batch: int | None = None
) -> Iterator:
    """The per-item twin of ``StableAudio3.stream``.

    Yields ``StepEvent`` over the steps of every DiT batch (one running count), ``AudioEvent`` pieces with ``item``
    set (audio (1, 2, n) of that item), and one ``DoneEvent`` whose ``seeds``/``latents`` are per item.
    """
    from .pipeline import AudioEvent, DoneEvent, GenerationCancelled, StepEvent

    items = plan_items(pipe, request)
    batches = group_items(items, max_batch)
    model = pipe.model
    total_steps = sum(b[0].plan.steps for b in batches)
    timings = {"text": 0.0, "sampling": 0.0, "decoding": 0.0, "dit_batches": len(batches)}
    latents_out: list = [None] * len(items)

    def emit(event):
        if callback is not None and callback(event) is False:
            raise GenerationCancelled("generation cancelled by the callback")
        return event

    done_steps = 0
    start_all = time.perf_counter()
    for batch in batches:
        plans = [it.plan for it in batch]
        first = plans[0]
        start = time.perf_counter()
        mask, known = _inpaint_inputs(plans, model.latent_dim)
        negatives = [p.negative_prompts[0] for p in plans] if first.negative_prompts is not None else None
        cond = model.conditioning(
            [p.prompts[0] for p in plans],
            [p.duration for p in plans],
            inpaint_mask=mask,
            inpaint_known_latents=known,
            length=first.length,
            negative_prompts=negatives,
        )
        mx.eval(cond)
        timings["text"] += time.perf_counter() - start

        start = time.perf_counter()
        latents = None
        for step in model.sample_iter(
            _cat([p.noise for p in plans]),
            cond,
            first.steps,
            first.sampler,
            first.cfg_scale,
            first.apg_scale,
            _cat([p.init_latents for p in plans]),
            first.init_noise_level,
            noise_fn=_stack_noise_fn([it.seed for it in batch]),
            schedule_length=first.schedule_length,
        ):
            latents = step.x
            done_steps += 1
            yield emit(StepEvent(done_steps - 1, total_steps, step.t, time.perf_counter() - start_all))
        del cond
        timings["sampling"] += time.perf_counter() - start

        start = time.perf_counter()
        latents = latents.astype(mx.float32)
        offset, longest = 0, max(p.num_samples for p in plans)
        keep = -(-longest // model.downsampling_ratio)  # no window past the longest item's audio
        for piece in model.autoencoder.decode_stream(latents, chunk_latents=chunk_latents, keep_latents=keep):
            if offset >= longest:
                break
            for row, (item, plan) in enumerate(zip(batch, plans)):
                take = min(piece.shape[-1], plan.num_samples - offset)
                if take > 0:
                    audio = np.asarray(piece[row : row + 1, :, :take], dtype=np.float32)
                    if not np.isfinite(audio).all():  # before the clamp, which would turn inf into full scale
                        raise NonFiniteError(f"item {item.index + 1}: the decoded audio is not finite")
                    audio = np.clip(audio, -1.0, 1.0)
                    yield emit(AudioEvent(audio, offset, plan.num_samples, item=item.index))
            offset += piece.shape[-1]
        for row, item in enumerate(batch):
            latents_out[item.index] = latents[row : row + 1]
        timings["decoding"] += time.perf_counter() - start
    seeds = [it.seed for it in items]
    yield emit(DoneEvent(latents_out, seeds[0], timings, seeds=seeds))


def collect_items(events, count: int) -> tuple:
    """Per-item (2, n) audio from a :func:`stream_items` event stream, and its final event."""
    pieces: list = [[] for _ in range(count)]
    done = None
    for event in events:
        if event.stage == "decoding":
            pieces[event.item].append(event.audio[0])
        elif event.stage == "done":
            done = event
    return [np.concatenate(p, axis=-1) for p in pieces], done


def pad_items(items: list) -> np.ndarray:
    """(B, 2, N) with every item zero-padded to the longest, as the official batched generate returns them."""
    longest = max(a.shape[-1] for a in items)
    out = np.zeros((len(items), items[0].shape[0], longest), dtype=np.float32)
    for i, a in enumerate(items):
        out[i, :, : a.shape[-1]] = a
    return out
