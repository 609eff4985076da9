"""Packed forward passes: many requests' tokens in one sequence, each attending to its own keys and values only.

The continuous scheduler runs the model on one packed row of T tokens: the next token of every decoding
request plus chunks of the prompts being prefilled. Each token carries its own position (`position_ids`), so
rotary embeddings are right, and the experts see every real token of the step at once, with no padding.

Attention is the only place where the requests must stay apart. `packed_attention` is registered with
transformers' attention interface; while a step runs (`StepLayout.active`), it stores the step's keys and
values in the `KVPool` and computes each request's attention over its own history by calling transformers'
own SDPA attention on the request's slice: decoding requests in buckets of similar length (one query each,
padded keys masked out), each prefill chunk on its own (causal, offset by the tokens already cached).

A model can run packed when every decoder layer mixes tokens through the attention interface with plain
scaled dot-product attention; `PackedUnsupported` is raised otherwise (attention sinks, soft-capping, a
position bias, state-space or linear-attention layers, ...), and the scheduler falls back to `generate`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION = "fiddler_packed"
DECODE_BUCKET_ROWS = 256
"""Decoding requests whose attention is computed together (sorted by length, so padding stays small)."""


class PackedUnsupported(RuntimeError):
    """The model does something in attention that the packed path cannot reproduce exactly."""


class KVPool:
    """Keys and values of every request in flight: per layer one tensor [heads, slots, dim] for keys and one for
    values; each request owns a contiguous range of slots (its prompt plus its largest completion), so a
    prefill reads its history as a view and nothing is ever moved.

    Per-layer tensors are made at the layer's first write, with the shapes the layer's keys and values have
    (layers of one model may differ).
    """

    def __init__(self, slots: int, device: torch.device, dtype: torch.dtype):
        self.slots = slots
        self.device = device
        self.dtype = dtype
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.free: list[tuple[int, int]] = [(0, slots)]  # (start, length), sorted by start, coalesced

    def reserve(self, length: int) -> int | None:
        """The start of a free range of `length` slots (first fit), or None when none is free."""
        for i, (start, size) in enumerate(self.free):
            if size >= length:
                if size == length:
                    del self.free[i]
                else:
                    self.free[i] = (start + length, size - length)
                return start
        return None

    def release(self, start: int, length: int) -> None:
        i = bisect.bisect_left(self.free, (start, 0))
        self.free.insert(i, (start, length))
        # Coalesce with the neighbours.
        if i + 1 < len(self.free) and start + length == self.free[i + 1][0]:
            self.free[i] = (start, length + self.free[i + 1][1])
            del self.free[i + 1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == start:
            self.free[i - 1] = (self.free[i - 1][0], self.free[i - 1][1] + self.free[i][1])
            del self.free[i]

    @property
    def free_slots(self) -> int:
        return sum(size for _, size in self.free)

    def largest_free(self) -> int:
        return max((size for _, size in self.free), default=0)

    def layer(self, index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s key and value tensors ([Hkv, slots, D]), made to fit `key`/`value` ([Hkv, T, D])."""
        if index not in self.keys:
            self.keys[index] = torch.zeros(key.shape[0], self.slots, key.shape[-1], dtype=key.dtype, device=key.device)
            self.values[index] = torch.zeros(
                value.shape[0], self.slots, value.shape[-1], dtype=value.dtype, device=value.device
            )
        return self.keys[index], self.values[index]


@dataclass(frozen=True)
class Chunk:
    """A run of one request's prompt tokens in the packed row: queries [start, start + length) of the row, whose
    keys and values live at slots [kv_start, kv_start + cached + length) of the pool."""

    start: int
    length: int
    kv_start: int
    cached: int
    """Tokens of this request already in the pool before this chunk."""


@dataclass(frozen=True)
class DecodeBucket:
    """Decoding requests attended together: each has one query at `queries[r]` and `lengths[r]` cached tokens
    (this step's included) at slots `index[r, :lengths[r]]`."""

    queries: torch.Tensor  # [Rb] positions in the packed row
    index: torch.Tensor  # [Rb, Lb] pool slots (padded with the first slot)
    positions: torch.Tensor  # [Rb, Lb] token position of each key (for masks)
    lengths: torch.Tensor  # [Rb]


class StepLayout:
    """Where each token of one packed step goes and what it attends to (shared by every layer of the step)."""

    active: StepLayout | None = None

    def __init__(
        self,
        pool: KVPool,
        slots: torch.Tensor,
        chunks: list[Chunk],
        decodes: Sequence[tuple[int, int, int]],
        tokens: int,
    ):
        """`slots` [T]: each packed token's slot; `decodes`: (packed position, kv_start, cached length incl. this
        token) per decoding request."""
        self.pool = pool
        self.slots = slots  # [T]
        self.chunks = chunks
        self.tokens = tokens
        self.buckets = _buckets(decodes, pool.device)
        self.layers_seen: set[int] = set()

    def __enter__(self) -> StepLayout:
        StepLayout.active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        StepLayout.active = None


def _buckets(decodes: Sequence[tuple[int, int, int]], device: torch.device) -> list[DecodeBucket]:
    ordered = sorted(decodes, key=lambda d: d[2])
    buckets = []
    for first in range(0, len(ordered), DECODE_BUCKET_ROWS):
        part = ordered[first : first + DECODE_BUCKET_ROWS]
        longest = part[-1][2]
        offsets = torch.arange(longest)  # [Lb]
        starts = torch.tensor([d[1] for d in part])  # [Rb]
        lengths = torch.tensor([d[2] for d in part])  # [Rb]
        positions = offsets[None, :].expand(len(part), longest)  # [Rb, Lb]
        index = starts[:, None] + torch.minimum(positions, lengths[:, None] - 1)  # [Rb, Lb]
        buckets.append(
            DecodeBucket(
                queries=torch.tensor([d[0] for d in part], device=device),
                index=index.to(device),
                positions=positions.to(device),
                lengths=lengths.to(device),
            )
        )
    return buckets


UNSUPPORTED_KWARGS = ("s_aux", "softcap", "position_bias", "sinks")
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""Every SDPA backend but cuDNN's, which builds a plan for each new shape (about 7 ms of host time per call
on an H200), and packed steps give it a new shape on almost every call."""


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, D], key [1, Hkv, T, D], value [1, Hkv, T, Dv] -> ([1, T, Hq, Dv], None)."""

    layout = StepLayout.active
    if layout is None:
        raise PackedUnsupported("packed attention called outside a packed step")
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise PackedUnsupported(f"attention uses {name}")
    if getattr(module, "is_causal", True) is False or query.shape[0] != 1:
        raise PackedUnsupported("attention is not causal self-attention over one packed row")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    layer = int(getattr(module, "layer_idx", -1))
    layout.layers_seen.add(layer)
    keys, values = layout.pool.layer(layer, key[0], value[0])  # [Hkv, S, D], [Hkv, S, Dv]
    keys.index_copy_(1, layout.slots, key[0])
    values.index_copy_(1, layout.slots, value[0])

    out = query.new_empty(query.shape[2], query.shape[1], value.shape[-1])  # [T, Hq, Dv]
    with sdpa_kernel(SDPA_BACKENDS):
        _attend(module, query, keys, values, out, layout, window, scaling)
    return out[None], None


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    out: torch.Tensor,
    layout: StepLayout,
    window: int | None,
    scaling: float | None,
) -> None:
    """Each prefill chunk over its own history, then each bucket of decoding requests; results into `out`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    common = {"dropout": 0.0, "scaling": scaling}
    for chunk in layout.chunks:
        q = query[:, :, chunk.start : chunk.start + chunk.length]  # [1, Hq, c, D]
        total = chunk.cached + chunk.length
        k = keys[None, :, chunk.kv_start : chunk.kv_start + total]  # [1, Hkv, L, D]
        v = values[None, :, chunk.kv_start : chunk.kv_start + total]  # [1, Hkv, L, Dv]
        mask = None
        if chunk.cached or (window is not None and total > window):
            q_pos = torch.arange(chunk.cached, total, device=q.device)[:, None]  # [c, 1]
            k_pos = torch.arange(total, device=q.device)[None, :]  # [1, L]
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= k_pos > q_pos - window
            mask = allowed[None, None]  # [1, 1, c, L]
        result, _ = sdpa_attention_forward(module, q, k, v, mask, is_causal=mask is None, **common)
        out[chunk.start : chunk.start + chunk.length] = result[0]  # [c, Hq, Dv]
    for bucket in layout.buckets:
        out[bucket.queries] = _decode_attention(query, keys, values, bucket, window, scaling)


def _decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bucket: DecodeBucket,
    window: int | None,
    scaling: float | None,
) -> torch.Tensor:
    """One query per request over its own cached keys: [Rb, Hq, Dv].

    The query heads that share a key/value head are attended together as that head's queries (query head h
    reads key head h // groups, as transformers' repeat_kv has it), so keys are gathered once per request
    and never repeated."""
    kv_heads, head_dim = keys.shape[0], query.shape[-1]
    rows = bucket.queries.shape[0]
    groups = query.shape[1] // kv_heads
    q = query[0][:, bucket.queries].transpose(0, 1).reshape(rows, kv_heads, groups, head_dim)  # [Rb, Hkv, g, D]
    k = keys[:, bucket.index].transpose(0, 1)  # [Rb, Hkv, Lb, D]
    v = values[:, bucket.index].transpose(0, 1)  # [Rb, Hkv, Lb, Dv]
    current = bucket.lengths[:, None] - 1  # [Rb, 1]: the query's own position
    allowed = bucket.positions <= current  # [Rb, Lb]
    if window is not None:
        allowed &= bucket.positions > current - window
    result = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed[:, None, None, :], scale=scaling
    )  # [Rb, Hkv, g, Dv]
    return result.reshape(rows, kv_heads * groups, v.shape[-1])


TOKEN_MIXERS = ("conv", "mamba", "recurrent", "linearattention", "deltanet", "ssm", "rwkv", "indexer", "retention")
"""Words in module class names that mark token mixing outside attention (convolutions over the sequence,
state-space or linear-attention layers, sparse-attention indexers with caches of their own): a packed row
would mix requests there."""


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the model cannot run packed steps, when that can be told from its modules; None otherwise (the first
    step still checks that every decoder layer attends through the interface)."""
    for name, module in model.named_modules():
        kind = type(module).__name__.lower().replace("_", "")
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) or any(word in kind for word in TOKEN_MIXERS):
            return f"{name} ({type(module).__name__}) mixes tokens outside attention"
    return None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, packed_attention)
