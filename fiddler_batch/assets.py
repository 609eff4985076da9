"""Everything the engine needs from files, found by the caller: the checkpoint, the cost model, the profile.

- **Model path** (`resolve_model`): `demo:NAME` is built locally on first use; a local folder must hold a
  `config.json`; anything else is a hub id, downloaded (safetensors and tokenizer files only) into the hub
  cache. Resolved once, here.
- **Weights** (`load_engine`): a safetensors checkpoint is read tensor by tensor straight into its final place
  (`fiddler_batch.checkpoint`), so host memory peaks at about what must stay on the host; a checkpoint the
  reader cannot stream (another format, a conversion it does not know) is loaded by transformers instead, and
  the log says so.
- **Cost model**: `engine.calibration` when set, else this machine's cache entry
  (`$FIDDLER_BATCH_CACHE/calibration/MACHINE/GEOMETRY-tTHREADS.json`), else a quick measurement, saved there.
- **Popularity profile**: `engine.profile`, written by `fiddler-batch profile`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from fiddler_batch.errors import EngineError
from fiddler_batch.io.atomic import atomic_write_text
from fiddler_batch.machine import cache_root, cpu_name
from fiddler_batch.spec import EngineSpec, ModelSpec

log = logging.getLogger("fiddler_batch.engine")

HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
"""What a hub download fetches: config, weights (safetensors only) and tokenizer files."""
HUB_FILES_WITHOUT_WEIGHTS = ["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]
"""What a dry run fetches: the config, the safetensors index and the tokenizer, no weights."""


# -- the model ------------------------------------------------------------------------------------------


def resolve_model(spec: ModelSpec, weights: bool = True) -> Path:
    """The local checkpoint folder of `model.path`: the demo built, the local folder checked, or the hub id
    downloaded (without `weights`: its config and tokenizer files only)."""
    path = spec.path
    if path.startswith("demo:"):
        from fiddler_batch.demo import ensure_demo_checkpoint

        return ensure_demo_checkpoint(path[len("demo:") :])
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise EngineError(
                "model.path",
                f"{path!r} is a folder without config.json",
                "give the folder that holds the checkpoint's config.json",
            )
        return local
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise EngineError(
            "model.path", f"{path!r} does not exist", "give a checkpoint folder, a hub id or demo:tiny-mixtral"
        )
    return _download(path, spec.revision, HUB_FILES if weights else HUB_FILES_WITHOUT_WEIGHTS)


def _download(repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types (offline, unknown repo, gated, ...)
        raise EngineError(
            "model.path",
            f"cannot fetch the hub model {repo!r}{f' at revision {revision!r}' if revision else ''}: {exc}",
            "check the id and your network (or HF_TOKEN for gated models), or download it and give its folder",
        ) from None


def load_engine(
    model: ModelSpec,
    settings: EngineSpec,
    *,
    kv_cache_tokens: int | str = 0,
    activation_tokens: int | None = None,
    calibrate: bool = True,
) -> Any:
    """The engine for a job's model: weights placed, profile applied, cost model installed (measured quickly
    and cached when this machine has none, unless `calibrate` is False)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from fiddler_batch.checkpoint import Checkpoint, CheckpointUnsupported
    from fiddler_batch.engine import Engine

    folder = resolve_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise EngineError(
            "model.path", f"cannot read the model at {model.path!r}: {exc}", "check the checkpoint folder"
        ) from None
    popularity = None
    if settings.profile is not None:
        popularity = load_profile(settings.profile)
    dtype = None if model.dtype == "auto" else getattr(torch, model.dtype)
    started = time.perf_counter()
    try:
        checkpoint = Checkpoint.open(folder)
        skeleton = checkpoint.skeleton(config, dtype or "auto")  # 'auto': the config's dtype, else the checkpoint's
        with checkpoint.bind(skeleton) as binding:
            engine = Engine.from_weights(
                skeleton,
                binding,
                settings,
                tokenizer,
                kv_cache_tokens=kv_cache_tokens,
                activation_tokens=activation_tokens,
                popularity=popularity,
            )
        how = f"streamed {checkpoint.nbytes / 1e9:.2f} GB of safetensors"
    except CheckpointUnsupported as exc:
        log.warning("loading %s through transformers (%s): host memory may peak at twice its size", model.path, exc)
        hf_model = _from_pretrained(folder, dtype)
        engine = Engine.from_model(
            hf_model,
            settings,
            tokenizer,
            kv_cache_tokens=kv_cache_tokens,
            activation_tokens=activation_tokens,
            popularity=popularity,
        )
        how = "loaded by transformers"
    log.info("model %s %s in %.1f s", model.path, how, time.perf_counter() - started)
    if engine.needs_cost_model and calibrate:
        engine.set_cost_model(cost_model_for(engine, settings))
    return engine


def _config_dtype(config: Any) -> Any:
    import torch

    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _from_pretrained(folder: Path, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto")
    except (OSError, ValueError) as exc:
        raise EngineError(
            "model.path", f"cannot load the model at {folder}: {exc}", "check the checkpoint folder"
        ) from None


# -- the cost model -------------------------------------------------------------------------------------------


def machine_key(device: Any) -> str:
    """Names the hardware, not the host: nodes of one type in a cluster share a calibration."""
    import torch

    parts = [cpu_name(), f"{os.cpu_count()}cpu"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return re.sub(r"[^A-Za-z0-9.]+", "-", "_".join(parts)).strip("-")


def cost_cache_path(engine: Any) -> Path:
    """This machine's cache entry for the engine's expert geometry, dtype and thread count."""
    key = engine.cost_key()
    return calibration_path(engine.device, key["geometry"], key["threads"])


def calibration_path(device: Any, geometry: str, threads: int) -> Path:
    """The cache entry of a calibration for this machine (with `device` as the fast device), an expert geometry
    (`ExpertLayout.geometry_key`) and a CPU thread count: what a run looks up, found without an engine."""
    return cache_root() / "calibration" / machine_key(device) / f"{geometry}-t{threads}.json"


def cost_model_for(engine: Any, settings: EngineSpec) -> Any:
    """engine.calibration, else this machine's cache entry, else a quick measurement saved to the cache."""
    if settings.calibration is not None:
        if not Path(settings.calibration).is_file():
            raise EngineError(
                "engine.calibration",
                f"the calibration file {str(settings.calibration)!r} does not exist",
                f"run `fiddler-batch calibrate JOB --output {settings.calibration}`, or leave the key out to use "
                "this machine's cache",
            )
        return load_cost_model(Path(settings.calibration))
    path = cost_cache_path(engine)
    if path.is_file():
        cost = load_cost_model(path)
        stale = _stale(engine, settings, cost)
        if stale is None:
            return cost
        log.warning(
            "the cached calibration %s %s: measuring a quick one now; `fiddler-batch calibrate` makes a full one",
            path,
            stale,
        )
    else:
        log.warning(
            "no calibration for this machine and expert shape (%s): measuring a quick one now; "
            "`fiddler-batch calibrate` makes a full one",
            path,
        )
    started = time.perf_counter()
    cost = engine.measure_cost_model(quick=True)
    save_cost_model(cost, path, engine)
    log.warning("quick calibration took %.1f s (saved to %s)", time.perf_counter() - started, path)
    return cost


def _stale(engine: Any, settings: EngineSpec, cost: Any) -> str | None:
    """Why a cached calibration must be measured again (None: it serves): it predates the own CPU kernel
    that this engine would use, or it timed one expert again and again (warm in the CPU's caches, which a
    run never is) instead of experts in turn."""
    executor = getattr(engine, "executor", None)
    if settings.cpu_gemv != "off" and cost.cpu_gemv_ms is None and executor is not None and executor.gemv_possible():
        return "has no times for the CPU's own kernel (engine.cpu_gemv), which this machine can build"
    if "cold_experts" not in cost.meta:
        return "timed one expert again and again (warm in the CPU's caches) rather than experts in turn"
    return None


def save_cost_model(cost: Any, path: Path, engine: Any) -> None:
    data = cost.to_json()
    data["meta"] = {**data.get("meta", {}), "machine": machine_key(engine.device)}
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def load_cost_model(path: Path) -> Any:
    from fiddler_batch.engine.costmodel import CostModel

    try:
        return CostModel.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(
            "engine.calibration",
            f"cannot read the calibration file {path}: {exc}",
            "run `fiddler-batch calibrate JOB` again",
        ) from None


# -- the popularity profile ----------------------------------------------------------------------------------


def load_profile(path: Path) -> list[list[float]]:
    """Routed-token counts per (MoE layer, expert) written by `fiddler-batch profile` (the engine checks that
    they fit the model)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        counts = data["counts"]
        return [[float(n) for n in row] for row in counts]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(
            "engine.profile",
            f"cannot read the popularity profile {str(path)!r}: {exc}",
            "run `fiddler-batch profile JOB` to write one, or leave engine.profile out",
        ) from None


def save_profile(profile: dict[str, Any], path: Path) -> None:
    atomic_write_text(path, json.dumps(profile, indent=1) + "\n")
