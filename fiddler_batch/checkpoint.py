"""Stream a Hugging Face safetensors checkpoint, tensor by tensor, into tensors that the caller allocates.

Why this exists: transformers' loader memory-maps every shard and copies each tensor out of the mapping
(converting legacy per-expert keys into fused 3-D experts on the way). While it loads, the process holds the
anonymous copies *and* the file-backed pages of the mapping, so a 93 GB checkpoint costs about twice its size
in resident memory on a 128 GB host. This reader never maps a file: each tensor (or one expert's rows of it)
is read with positioned reads straight into the destination's memory, or through one small reused staging
buffer when the destination is on the GPU or wants another dtype. Peak memory is therefore the destinations
plus a constant.

Typical use, with the caller deciding where every tensor goes::

    ckpt = Checkpoint.open(folder)                     # headers only, no tensor data
    model = ckpt.skeleton(config, "auto")              # parameters on meta, buffers real on the CPU
    with ckpt.bind(model) as binding:                  # model name -> checkpoint sources
        for name in binding.names():                   # mostly sequential file order
            dest = torch.empty(binding.shape(name), dtype=binding.dtype(name), device=...)
            binding.fill(name, dest)                   # or fill(name, rows[j], index=e), one expert
            assign(model, name, dest)                  # parameter, or persistent buffer
        binding.tie_weights(model)                     # e.g. lm_head.weight <- embed_tokens.weight

What the caller must know:

* `names()` holds parameters (tied ones once: the name the checkpoint holds) and the persistent buffers the
  checkpoint holds (e.g. DeepSeek's `e_score_correction_bias`); other buffers keep the skeleton's values,
  computed by the model's own `__init__` (rotary `inv_freq`, ...).
* Tied names that are not filled are in `Binding.tied`; after the filled tensors are in the model, call
  `binding.tie_weights(model)` (= transformers' `model.tie_weights(missing_keys=..., recompute_mapping=False)`,
  which also ties the other way round when the checkpoint holds the head instead of the embedding).
* `dtype(name)` is the dtype from_pretrained gives that tensor (keep-in-fp32 routers stay float32); `fill`
  converts to whatever dtype `dest` has. `skeleton(config, "auto")` resolves 'auto' like from_pretrained:
  the config's dtype if it names one, else `Checkpoint.dtype()`.
* CheckpointUnsupported means "use from_pretrained instead"; CheckpointCorrupt (an OSError naming the shard)
  means the files themselves are damaged, where falling back would not help.

Key conversions (legacy per-expert keys -> fused experts, renamings, base-model prefix) are taken from
transformers' own conversion mapping for the model (`get_model_conversion_mapping`, `rename_source_key`), so
no family is hard-coded here. Only the operations that are pure re-arrangements of whole source tensors are
supported (`MergeModulelist(dim=0)`, optionally followed by `Concatenate(dim>=1)`); anything else raises
`CheckpointUnsupported` and the caller falls back to `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import os
import struct
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

STAGING_BYTES = 64 << 20
"""Bound on the staging buffer used when a tensor cannot be read straight into its destination."""

_MAX_READ = 1 << 30
"""Largest single read request; Linux caps one read near 2 GiB anyway, and shorter requests stay interruptible."""

_MAX_HEADER = 100 << 20
"""safetensors refuses headers larger than this; a larger length prefix means a damaged file."""

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


class CheckpointUnsupported(Exception):
    """The folder cannot be streamed by this reader (reason in str()).

    The caller falls back to transformers' from_pretrained.
    """


class CheckpointCorrupt(OSError):
    """A shard is damaged (truncated, bad header, missing): falling back to from_pretrained would not help.

    `filename` holds the shard's path; the message says which tensor or byte range is affected.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(errno.EIO, message, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files and headers


@dataclass(frozen=True)
class _Tensor:
    """Where one checkpoint tensor (or a dim-0 slice of it) lives: a contiguous, row-major byte range of a shard."""

    key: str
    shard: int
    offset: int  # absolute byte offset of the data in the shard file
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def row(self, index: int) -> _Tensor:
        """Slice [index] along dim 0: its bytes are contiguous, so only they are read."""
        if not self.shape or not 0 <= index < self.shape[0]:
            raise IndexError(f"index {index} out of range for {self.key} of shape {list(self.shape)}")
        row_bytes = self.nbytes // self.shape[0]
        return _Tensor(f"{self.key}[{index}]", self.shard, self.offset + index * row_bytes, self.shape[1:], self.dtype)


def _shard_names(folder: Path) -> list[str]:
    """The shard files, from the index when there is one: the same files from_pretrained would read."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointCorrupt(index, f"not a safetensors index ({error})") from error
        return sorted(set(weight_map.values()))
    if (folder / SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    found = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointUnsupported(
        f"{folder} has neither {INDEX_NAME} nor {SINGLE_NAME} (found: {', '.join(found) or 'nothing'}); "
        "only safetensors checkpoints can be streamed"
    )


def _read_header(path: Path, shard: int) -> dict[str, _Tensor]:
    """Parse one shard's header (8-byte little-endian length, then JSON) and check every tensor fits in the file.

    Checking sizes here turns a truncated download into an error at open time, before any tensor is placed.
    """
    try:
        file = open(path, "rb")
    except FileNotFoundError as error:
        raise CheckpointCorrupt(path, "shard listed in the index is missing") from error
    with file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointCorrupt(path, f"file is {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER):
            raise CheckpointCorrupt(path, f"header length {length} does not fit in a file of {size} bytes (truncated?)")
        raw = file.read(length)
    if len(raw) < length:
        raise CheckpointCorrupt(path, f"file ends inside its {length}-byte header: the shard is truncated")
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise CheckpointCorrupt(path, f"header is not valid JSON ({error})") from error
    data_start = 8 + length
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        tensors[key] = _parse_entry(path, shard, key, entry, data_start, size)
    return tensors


def _parse_entry(path: Path, shard: int, key: str, entry: Any, data_start: int, size: int) -> _Tensor:
    """One header entry -> _Tensor, refusing unknown dtypes and byte ranges that do not match shape or file."""
    try:
        dtype_name = entry["dtype"]
        shape = tuple(int(size) for size in entry["shape"])
        begin, end = (int(offset) for offset in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointCorrupt(path, f"bad header entry for {key}: {entry!r}") from error
    dtype = _DTYPES.get(dtype_name)
    if dtype is None:
        raise CheckpointUnsupported(f"{path}: tensor {key} has dtype {dtype_name}, which this reader does not handle")
    tensor = _Tensor(key, shard, data_start + begin, shape, dtype)
    if begin < 0 or end - begin != tensor.nbytes:
        needs = f"{dtype_name}{list(shape)} needs {tensor.nbytes}"
        raise CheckpointCorrupt(path, f"tensor {key} spans bytes [{begin}, {end}) but {needs}")
    if data_start + end > size:
        ends = f"tensor {key} ends at byte {data_start + end}"
        raise CheckpointCorrupt(path, f"file is {size} bytes but {ends}: the shard is truncated")
    return tensor


# ----------------------------------------------------------------------------------------------------------------
# The model skeleton


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move every parameter to the meta device as it is registered; buffers stay real on the CPU.

    Like accelerate's `init_empty_weights(include_buffers=False)`: parameters cost no memory (the caller
    allocates them where they belong), while buffers such as rotary `inv_freq` are computed as usual.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        param = module._parameters.get(name)
        if param is None or param.device.type == "meta":
            return
        moved = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)
        moved.__dict__.update(param.__dict__)
        module._parameters[name] = moved

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _reject_quantized(config: Any) -> None:
    """Quantized checkpoints need transformers' quantizer (scales, packed blocks): not a plain byte copy."""
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        if isinstance(quantization, dict):
            method = quantization.get("quant_method")
        else:
            method = getattr(quantization, "quant_method", None)
        raise CheckpointUnsupported(
            f"the checkpoint is quantized (quant_method={method}); only plain dtypes can be streamed"
        )


def _apply_dtype_plan(model: nn.Module, dtype: torch.dtype) -> None:
    """Give parameters and floating buffers under `_keep_in_fp32_modules(_strict)` the dtype from_pretrained would
    load them in (transformers versions differ in which names the plan holds: routers, correction biases)."""
    get_plan = getattr(model, "_get_dtype_plan", None)
    plan = get_plan(dtype) if get_plan is not None else {}
    if not plan:
        return
    from transformers.core_model_loading import build_glob_alternation

    alternation, group_to_glob, _ = build_glob_alternation(list(plan))
    replaced: dict[int, nn.Parameter] = {}  # keeps tied parameters tied
    for module_name, module in model.named_modules(remove_duplicate=False):
        for leaf, param in list(module._parameters.items()):
            match = alternation.search(f"{module_name}.{leaf}" if module_name else leaf) if param is not None else None
            if match is None:
                continue
            wanted = plan[group_to_glob[match.lastgroup]]
            if param.dtype != wanted:
                if id(param) not in replaced:
                    replaced[id(param)] = nn.Parameter(param.detach().to(wanted), requires_grad=param.requires_grad)
                module._parameters[leaf] = replaced[id(param)]
        for leaf, buffer in list(module._buffers.items()):
            if buffer is None or not buffer.is_floating_point():
                continue
            match = alternation.search(f"{module_name}.{leaf}" if module_name else leaf)
            if match is not None and buffer.dtype != plan[group_to_glob[match.lastgroup]]:
                module._buffers[leaf] = buffer.to(plan[group_to_glob[match.lastgroup]])


def _resolve_dtype(config: Any, dtype: torch.dtype | str, checkpoint: Checkpoint) -> torch.dtype:
    """'auto' means what from_pretrained means: the config's dtype if it names one, else the checkpoint's."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, a dtype name or 'auto', not {dtype!r}")
        return resolved
    declared = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else checkpoint.dtype()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint


class Checkpoint:
    """The tensors of a safetensors checkpoint folder, known from the shard headers only."""

    def __init__(self, folder: Path, files: list[Path], tensors: dict[str, _Tensor]) -> None:
        self.folder = folder
        self.files = files
        self._tensors = tensors

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        """Parse `model.safetensors.index.json` (or the single `model.safetensors`) and every shard's header.

        No tensor data is read. Raises CheckpointUnsupported when there are no safetensors files (e.g. only
        pytorch_model.bin) and CheckpointCorrupt when a shard is missing, damaged or truncated.
        """
        folder = Path(folder)
        files = [folder / name for name in _shard_names(folder)]
        tensors: dict[str, _Tensor] = {}
        for shard, path in enumerate(files):
            for key, tensor in _read_header(path, shard).items():
                tensors.setdefault(key, tensor)
        return cls(folder, files, tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(tensor.nbytes for tensor in self._tensors.values())

    def keys(self) -> list[str]:
        return list(self._tensors)

    def dtype(self) -> torch.dtype:
        """The dtype of most of its floating-point bytes (what a mixed checkpoint is 'in')."""
        weights: Counter[torch.dtype] = Counter()
        for tensor in self._tensors.values():
            if tensor.dtype.is_floating_point:
                weights[tensor.dtype] += tensor.nbytes
        if not weights:
            raise CheckpointUnsupported(f"{self.folder} holds no floating-point tensors")
        return weights.most_common(1)[0][0]

    def skeleton(self, config: Any, dtype: torch.dtype | str) -> nn.Module:
        """AutoModelForCausalLM's model for `config`: parameters on meta, buffers real on the CPU, eval mode, `dtype`.

        Built through `from_config`, which runs the same `__init__` as from_pretrained, so the attention and
        experts implementations default the same way (sdpa where the model supports it). `dtype` may be 'auto'.
        The caller's config is not modified.
        """
        from transformers import AutoModelForCausalLM

        _reject_quantized(config)
        dtype = _resolve_dtype(config, dtype, self)
        config = copy.deepcopy(config)
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _apply_dtype_plan(model, dtype)
        return model.eval()

    def bind(self, model: nn.Module) -> Binding:
        """Map every parameter of `model` (tied ones once) and each held persistent buffer to checkpoint sources.

        Raises CheckpointUnsupported naming the first parameter without sources, or the first conversion
        this reader cannot do. Checkpoint keys that match nothing in the model are ignored, as from_pretrained
        does (e.g. multi-token-prediction layers); they are listed in `Binding.unexpected`.
        """
        _reject_quantized(getattr(model, "config", None))
        groups, unexpected = _route_keys(self._tensors, model)
        targets, tied = _bind_targets(model, groups)
        return Binding(self.files, targets, tied, unexpected)


def assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put a filled tensor into the skeleton under `name`, replacing its meta parameter (or its CPU buffer).

    A parameter stays an nn.Parameter (with the skeleton's requires_grad where the dtype allows it); a buffer
    keeps its persistence. Tied names are not touched: call `Binding.tie_weights(model)` afterwards.
    """
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        grad = bool(old is not None and old.requires_grad and (tensor.is_floating_point() or tensor.is_complex()))
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of {type(model).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Binding checkpoint keys to model names


@dataclass
class _Group:
    """Checkpoint tensors that transformers would gather for one model name, and the converter that joins them."""

    converter: Any  # WeightConverter or None for a plain (possibly renamed) tensor
    sources: dict[str, list[_Tensor]]  # source pattern (or original key) -> tensors, in transformers' order


def _route_keys(tensors: dict[str, _Tensor], model: nn.Module) -> tuple[dict[str, _Group], list[str]]:
    """Rename every checkpoint key exactly as from_pretrained does and group the tensors by model name.

    Keys are visited in transformers' `dot_natural_key` order, which is the order MergeModulelist stacks the
    experts in, so list position = expert index.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [entry for entry in conversions if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in conversions if isinstance(entry, WeightConverter)]
    pattern_to_converter = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)

    groups: dict[str, _Group] = {}
    unexpected: list[str] = []
    for key in sorted(tensors, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if name not in meta_state and key in meta_state:
            name, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_state)
        if name not in meta_state:
            unexpected.append(key)
            continue
        converter = pattern_to_converter[pattern] if pattern is not None else None
        group = groups.setdefault(name, _Group(converter, defaultdict(list)))
        if group.converter is not converter:
            raise CheckpointUnsupported(f"{name} is both stored whole and assembled from parts (key {key})")
        group.sources[pattern if pattern is not None else key].append(tensors[key])
    return groups, unexpected


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names that share one tensor (tied), in registration order; from identity and the tie mapping."""
    by_identity: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(param), []).append(name)
    owner = {name: names[0] for names in by_identity.values() for name in names}
    members = {names[0]: list(names) for names in by_identity.values()}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in owner and source in owner and owner[target] != owner[source]:
            keep, drop = owner[source], owner[target]
            for name in members.pop(drop):
                owner[name] = keep
                members[keep].append(name)
    return list(members.values())


def _bind_targets(model: nn.Module, groups: dict[str, _Group]) -> tuple[dict[str, _Target], dict[str, str]]:
    """One target per parameter (the tied name the checkpoint holds) and per held persistent buffer."""
    state = model.state_dict(keep_vars=True)
    targets: dict[str, _Target] = {}
    tied: dict[str, str] = {}
    aliases = _alias_groups(model)
    for names in aliases:
        held = [name for name in names if name in groups]
        if not held:
            raise CheckpointUnsupported(f"the checkpoint has no tensor for parameter {names[0]}")
        targets[held[0]] = _build_target(held[0], state[held[0]], groups[held[0]])
        tied.update({name: held[0] for name in names if name != held[0]})
    parameter_names = {name for names in aliases for name in names}
    for name, buffer in state.items():
        if name not in parameter_names and name in groups:
            targets[name] = _build_target(name, buffer, groups[name])
    return targets, tied


def _build_target(name: str, like: torch.Tensor, group: _Group) -> _Target:
    shape = tuple(like.shape)
    if group.converter is None:
        source = next(iter(group.sources.values()))[0]
        if source.shape != shape:
            raise CheckpointUnsupported(
                f"{name}: checkpoint tensor {source.key} has shape {list(source.shape)}, "
                f"the model expects {list(shape)}"
            )
        return _Direct(name, shape, like.dtype, source)
    return _Stacked(name, shape, like.dtype, _expert_pieces(name, shape, group))


def _merge_layout(name: str, converter: Any, ndim: int) -> int | None:
    """The per-expert concat dim of a supported op chain (None: MergeModulelist alone), else CheckpointUnsupported."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        raise CheckpointUnsupported(f"{name}: conversion {ops[0] if ops else ops!r} of {converter!r} is not supported")
    if len(ops) == 1:
        return None
    concat = ops[1]
    if len(ops) > 2:
        raise CheckpointUnsupported(f"{name}: conversion {ops[2]!r} of {converter!r} is not supported")
    if type(concat) is not Concatenate or not 1 <= concat.dim % max(ndim, 1) < ndim:
        raise CheckpointUnsupported(f"{name}: conversion {concat!r} of {converter!r} is not supported")
    return concat.dim % ndim - 1


def _expert_pieces(name: str, shape: tuple[int, ...], group: _Group) -> list[list[_Piece]]:
    """For each expert e, the source tensors that make up target[e] and where each sits along the concat dim.

    MergeModulelist(dim=0) stacks each source pattern's per-expert list; Concatenate(dim=d) then joins the
    patterns, in the converter's source order, along d (dim d - 1 of one expert's slice).
    """
    concat_dim = _merge_layout(name, group.converter, len(shape))
    patterns = [pattern for pattern in group.converter.source_patterns if pattern in group.sources]
    if concat_dim is None and len(patterns) != 1:
        raise CheckpointUnsupported(f"{name}: MergeModulelist over {len(patterns)} source patterns is not supported")
    experts = shape[0] if shape else 0
    counts = {pattern: len(group.sources[pattern]) for pattern in patterns}
    if any(count != experts for count in counts.values()):
        raise CheckpointUnsupported(f"{name}: expected {experts} experts, the checkpoint has {counts}")
    row = shape[1:]  # one expert's slice of the target, e.g. [2I, H]
    layout = []
    for expert in range(experts):
        pieces, start = [], 0
        for pattern in patterns:
            source = group.sources[pattern][expert]
            dim = 0 if concat_dim is None else concat_dim
            size = source.shape[dim] if len(source.shape) == len(row) else -1
            expected = row if concat_dim is None else row[:dim] + (size,) + row[dim + 1 :]
            if size < 0 or source.shape != expected:
                raise CheckpointUnsupported(
                    f"{name}: checkpoint tensor {source.key} has shape {list(source.shape)}, expected {list(expected)}"
                )
            pieces.append(_Piece(source, dim, start))
            start += size
        if concat_dim is not None and start != row[concat_dim]:
            raise CheckpointUnsupported(
                f"{name}: expert {expert}'s sources cover {start} of {row[concat_dim]} along dim {concat_dim + 1}"
            )
        layout.append(pieces)
    return layout


# ----------------------------------------------------------------------------------------------------------------
# Targets: how to write one model name from its sources


@dataclass(frozen=True)
class _Piece:
    """A whole source tensor that fills dest.narrow(dim, start, source.shape[dim]) of one expert's slice."""

    source: _Tensor
    dim: int
    start: int

    def view(self, dest: torch.Tensor) -> torch.Tensor:
        return dest.narrow(self.dim, self.start, self.source.shape[self.dim]) if dest.dim() else dest


@dataclass(frozen=True)
class _Target:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def writes(self, dest: torch.Tensor, index: int | None) -> Iterator[tuple[_Tensor, torch.Tensor]]:
        """(source, destination view) pairs that together fill `dest` (= target, or target[index])."""
        raise NotImplementedError

    def first_source(self) -> _Tensor:
        raise NotImplementedError

    def sources(self) -> list[str]:
        raise NotImplementedError


@dataclass(frozen=True)
class _Direct(_Target):
    """The model tensor is one checkpoint tensor (possibly renamed, possibly already a fused [E, ...] tensor)."""

    source: _Tensor

    def writes(self, dest: torch.Tensor, index: int | None) -> Iterator[tuple[_Tensor, torch.Tensor]]:
        yield (self.source if index is None else self.source.row(index)), dest

    def first_source(self) -> _Tensor:
        return self.source

    def sources(self) -> list[str]:
        return [self.source.key]


@dataclass(frozen=True)
class _Stacked(_Target):
    """A fused experts tensor [E, ...] assembled from per-expert checkpoint tensors."""

    experts: list[list[_Piece]]

    def writes(self, dest: torch.Tensor, index: int | None) -> Iterator[tuple[_Tensor, torch.Tensor]]:
        for expert in range(len(self.experts)) if index is None else (index,):
            if not 0 <= expert < len(self.experts):
                raise IndexError(f"index {expert} out of range for {self.name} with {len(self.experts)} experts")
            row = dest[expert] if index is None else dest  # [2I, H] for gate_up_proj
            for piece in self.experts[expert]:
                yield piece.source, piece.view(row)

    def first_source(self) -> _Tensor:
        return self.experts[0][0].source

    def sources(self) -> list[str]:
        return [piece.source.key for pieces in self.experts for piece in pieces]


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory: reads land there without a copy."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


class _Files:
    """Open shard files and positioned reads from them; a short read is an error, never silent garbage."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._open: dict[int, io.FileIO] = {}

    def _file(self, shard: int) -> io.FileIO:
        if shard not in self._open:
            self._open[shard] = io.FileIO(self._paths[shard], "r")
        return self._open[shard]

    def read(self, source: _Tensor, start: int, buffer: memoryview) -> None:
        """Fill `buffer` with the bytes of `source` from byte `start` on."""
        if start + len(buffer) > source.nbytes:
            raise ValueError(f"read of {len(buffer)} bytes at {start} overruns {source.key} ({source.nbytes} bytes)")
        file = self._file(source.shard)
        position, done = source.offset + start, 0
        while done < len(buffer):
            count = _pread_into(file, buffer[done : done + _MAX_READ], position + done)
            if count <= 0:
                raise CheckpointCorrupt(
                    self._paths[source.shard],
                    f"file ends at byte {position + done} inside tensor {source.key} "
                    f"(bytes {source.offset}..{source.offset + source.nbytes}): the shard is truncated",
                )
            done += count

    def close(self) -> None:
        for file in self._open.values():
            file.close()
        self._open.clear()


def _pread_into(file: io.FileIO, buffer: memoryview, position: int) -> int:
    """One positioned read into `buffer` (no intermediate bytes object); returns the count read, 0 at end of file."""
    if hasattr(os, "preadv"):
        return os.preadv(file.fileno(), [buffer], position)
    file.seek(position)
    return file.readinto(buffer) or 0


class _Staging:
    """One bounded, reused host buffer for reads that cannot land in their destination directly.

    For CUDA destinations it is pinned and used as two halves: while one half's host-to-device copy runs,
    the next chunk is read into the other; an event per half says when it may be overwritten.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer: torch.Tensor | None = None  # [limit] uint8
        self._pinned = False
        self._events: list[Any] = [None, None]  # torch.cuda.Event per half, or None when the half is free
        self._next = 0

    @property
    def chunk_bytes(self) -> int:
        return self.limit // 2

    def take(self, nbytes: int, pinned: bool) -> tuple[int, torch.Tensor]:
        """(slot, [nbytes] uint8 region of it) that no copy is still reading from."""
        if nbytes > self.chunk_bytes:
            raise ValueError(f"{nbytes} bytes do not fit one staging chunk of {self.chunk_bytes}")
        if self._buffer is None or (pinned and not self._pinned):
            self.drain()
            self._buffer = torch.empty(self.limit, dtype=torch.uint8, pin_memory=pinned)
            self._pinned = pinned
        slot, self._next = self._next, 1 - self._next
        if self._events[slot] is not None:
            self._events[slot].synchronize()
            self._events[slot] = None
        begin = slot * self.chunk_bytes
        return slot, self._buffer[begin : begin + nbytes]

    def copy(self, slot: int, staged: torch.Tensor, dest: torch.Tensor) -> None:
        """dest <- staged (same shape; converting dtype); asynchronous for CUDA, the slot's event recorded after it."""
        if dest.device.type != "cuda":
            dest.copy_(staged)
            return
        # non_blocking from pinned memory: the copy (and any dtype conversion, done on the GPU) is queued on
        # the current stream, and the slot stays reserved until its event has passed.
        dest.copy_(staged, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(dest.device))
        self._events[slot] = event

    def drain(self) -> None:
        """Wait for every pending copy: the destinations are complete and the buffer is free."""
        for slot, event in enumerate(self._events):
            if event is not None:
                event.synchronize()
                self._events[slot] = None

    def release(self) -> None:
        self.drain()
        self._buffer, self._pinned = None, False


# ----------------------------------------------------------------------------------------------------------------
# Binding


class Binding:
    """Model names -> checkpoint sources; fills caller-allocated tensors by positioned reads.

    Not thread-safe: one binding reads through one staging buffer.
    """

    def __init__(
        self, files: list[Path], targets: dict[str, _Target], tied: dict[str, str], unexpected: list[str]
    ) -> None:
        self._files = _Files(files)
        self._targets = targets
        self._staging = _Staging(STAGING_BYTES)
        self.tied = tied
        """Tied parameter names that are not filled -> the filled name they share a tensor with."""
        self.unexpected = unexpected
        """Checkpoint keys that match no model name (ignored, as from_pretrained ignores them)."""

    def names(self) -> list[str]:
        """Names it can fill, ordered by shard then offset of their first source, so reads are mostly sequential."""
        firsts = {name: target.first_source() for name, target in self._targets.items()}
        return sorted(self._targets, key=lambda name: (firsts[name].shard, firsts[name].offset))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._target(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The dtype from_pretrained would give it (the skeleton's, incl. keep-in-fp32 modules)."""
        return self._target(name).dtype

    def sources(self, name: str) -> list[str]:
        """The checkpoint keys it is made from."""
        return self._target(name).sources()

    def fill(self, name: str, dest: torch.Tensor, index: int | None = None) -> None:
        """Write `name` (or its slice [index] along dim 0, e.g. one expert) into `dest`.

        `dest` has that shape and any dtype and device. A contiguous CPU `dest` in the checkpoint's dtype is
        read into directly; anything else goes through the bounded staging buffer, chunk by chunk.
        """
        target = self._target(name)
        expected = target.shape if index is None else target.shape[1:]
        if tuple(dest.shape) != expected:
            where = name if index is None else f"{name}[{index}]"
            raise ValueError(f"{where} has shape {list(expected)}, dest has {list(dest.shape)}")
        try:
            for source, view in target.writes(dest, index):
                self._write(source, view)
        finally:
            self._staging.drain()

    def tie_weights(self, model: nn.Module) -> None:
        """Re-tie tied parameters once the filled ones are in `model` (e.g. lm_head.weight <- embed_tokens.weight).

        Uses transformers' own tying with the unfilled names as 'missing', so the tie goes from the name the
        checkpoint held to the other even when that is the reverse of the model's usual direction. Equivalent
        to `model.tie_weights()` in the usual case (the embedding held).
        """
        if not self.tied:
            return
        model.tie_weights(missing_keys=set(self.tied), recompute_mapping=False)
        for alias, held in self.tied.items():  # ties known only by identity in the skeleton
            if model.get_parameter(alias) is not model.get_parameter(held):
                module_name, _, leaf = alias.rpartition(".")
                model.get_submodule(module_name)._parameters[leaf] = model.get_parameter(held)

    def close(self) -> None:
        """Close the shard files and free the staging buffer."""
        self._staging.release()
        self._files.close()

    def __enter__(self) -> Binding:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _target(self, name: str) -> _Target:
        try:
            return self._targets[name]
        except KeyError:
            hint = f" (tied to {self.tied[name]})" if name in self.tied else ""
            raise KeyError(f"{name} is not filled by this binding{hint}") from None

    def _write(self, source: _Tensor, dest: torch.Tensor) -> None:
        if dest.numel() == 0:
            return
        if dest.device.type == "cpu" and dest.dtype == source.dtype and dest.is_contiguous():
            self._files.read(source, 0, _host_bytes(dest))
        else:
            self._write_staged(source, 0, dest)

    def _write_staged(self, source: _Tensor, start: int, dest: torch.Tensor) -> None:
        """dest <- source bytes [start, ...) through staging, split along leading dims to fit one chunk.

        `dest` may be strided (a narrow() of an expert slice): each chunk is a block of whole rows, or one row
        split further, so the copy never needs a contiguous view of dest.
        """
        nbytes = dest.numel() * source.itemsize
        if nbytes <= self._staging.chunk_bytes:
            slot, staged = self._staging.take(nbytes, pinned=dest.device.type == "cuda")
            self._files.read(source, start, _host_bytes(staged))
            self._staging.copy(slot, staged.view(source.dtype).view(dest.shape), dest)
            return
        rows = dest.shape[0]
        row_bytes = nbytes // rows
        if row_bytes > self._staging.chunk_bytes:
            for row in range(rows):
                self._write_staged(source, start + row * row_bytes, dest[row])
            return
        step = self._staging.chunk_bytes // row_bytes
        for row in range(0, rows, step):
            self._write_staged(source, start + row * row_bytes, dest[row : row + step])
