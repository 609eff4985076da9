"""Peak host memory of loading a checkpoint through the engine, measured from /proc/self/status.

    python benchmarks/memory.py CHECKPOINT [--resident 0.25] [--through-transformers]

Loads the checkpoint with `assets.load_engine` on the default device (the GPU when there is one) in this
process, after resetting its peak RSS (VmHWM) to the current RSS, and prints one JSON line: the growth of the
peak, of anonymous and of file-backed memory, the host bytes that must stay (the experts that are not resident
on the GPU), their ratio, and the load time. `--through-transformers` loads it the way the first version did
(transformers' from_pretrained, then the engine places the model), for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--resident", type=float, default=0.25)
    parser.add_argument("--through-transformers", action="store_true")
    args = parser.parse_args()
    import torch  # noqa: F401  (imported before the measurement starts)
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401

    import fiddler_batch.checkpoint as checkpoint
    from fiddler_batch.assets import load_engine
    from fiddler_batch.bench.hostmemory import reset_peak, status
    from fiddler_batch.spec import EngineSpec, ModelSpec

    if args.through_transformers:

        def refuse(cls: object, folder: object) -> None:
            raise checkpoint.CheckpointUnsupported("measuring the transformers path")

        checkpoint.Checkpoint.open = classmethod(refuse)  # type: ignore[method-assign, assignment]
    reset_peak()
    before = status()
    started = time.perf_counter()
    engine = load_engine(
        ModelSpec(path=str(args.checkpoint)),
        EngineSpec(resident_share=args.resident),
        kv_cache_tokens=65536,
        calibrate=False,
    )
    seconds = time.perf_counter() - started
    after = status()
    report = engine.placement.report
    host_experts = sum(t.numel() * t.element_size() for layer in engine.executor.layers for t in layer.host.values())
    # What must stay in host memory: the experts kept there, and on the CPU every other weight too.
    must_stay = host_experts + (report["non_expert_gb"] * 1e9 if engine.device.type == "cpu" else 0)
    peak = after["VmHWM"] - before["VmRSS"]
    print(
        json.dumps(
            {
                "path": "transformers" if args.through_transformers else "streamed",
                "checkpoint_gb": round(sum(p.stat().st_size for p in args.checkpoint.glob("*.safetensors")) / 1e9, 2),
                "device": str(engine.device),
                "resident_experts": report["resident_experts"],
                "total_experts": report["total_experts"],
                "must_stay_gb": round(must_stay / 1e9, 2),
                "peak_growth_gb": round(peak / 1e9, 2),
                "anon_growth_gb": round((after["RssAnon"] - before["RssAnon"]) / 1e9, 2),
                "file_growth_gb": round((after["RssFile"] - before["RssFile"]) / 1e9, 2),
                "peak_over_must_stay": round(peak / must_stay, 3) if must_stay else None,
                "load_s": round(seconds, 1),
            }
        ),
        flush=True,
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
