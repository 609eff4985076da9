"""How fast one expert runs on the CPU, against what the host's memory can be read at.

    python benchmarks/cpu_expert_probe.py [--hidden 4096] [--intermediate 14336] [--threads 16,12,8] [--source F.c]

One random bf16 expert of Mixtral's geometry (gate and up halves concatenated, SiLU gate), pinned when there
is a GPU. For each thread count and token count it times the expert several ways and prints one line each:

- `plain`: `F.linear` on the weights as stored (what CPU experts use without the own kernel or packed weights);
- `native`: `F.linear` with oneDNN turned off (`torch.backends.mkldnn.flags(enabled=False)`), so PyTorch's own
  reduced-precision kernels run (a GEMV with float32 sums at one token);
- `own`: the project's own kernel (`engine/cpugemv.py`, built here on first use);
- `packed`: the same weights reordered once for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`), then
  `torch.ops.mkldnn._linear_pointwise`;
- `--source FILE.c`: another build of the own kernel, named after the file;
- `NAME+copy` (with a GPU, at 1, 2 and 4 tokens): each of those while the link copies another expert to the GPU
  in a loop.

Each line gives the median ms of 7 runs, GB/s of weights read, that as a share of the host's read bandwidth
(a float32 sum over 1 GB with the same threads), the spread (max - min over the median) and whether the output
equals `plain`'s bit for bit.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from fiddler_batch.engine import cpugemv
from fiddler_batch.engine.costmodel import _times_ms, host_read_gb_per_s
from fiddler_batch.engine.cpugemv import SOURCE
from fiddler_batch.engine.cpupack import linear


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--threads", default=str(torch.get_num_threads()))
    parser.add_argument("--tokens", default="1,2,4,8,16,32")
    parser.add_argument("--source", action="append", default=[], help="another C source of the kernel to time too")
    args = parser.parse_args()
    h, i = args.hidden, args.intermediate
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    up = torch.empty(2 * i, h, dtype=torch.bfloat16, pin_memory=cuda).uniform_(-0.05, 0.05)
    down = torch.empty(h, i, dtype=torch.bfloat16, pin_memory=cuda).uniform_(-0.05, 0.05)
    nbytes = (up.numel() + down.numel()) * 2
    print(f"expert {nbytes / 1e6:.0f} MB, torch {torch.__version__}, mkldnn {torch.backends.mkldnn.is_available()}")
    ring = [(up.clone().pin_memory(), down.clone().pin_memory()) for _ in range(2)] if cuda else []
    slot = (torch.empty_like(up, device="cuda"), torch.empty_like(down, device="cuda")) if cuda else None

    def plain(x: torch.Tensor) -> torch.Tensor:
        gate, upv = F.linear(x, up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * upv, down)

    kernels = {}
    for path in args.source:  # each built as the package builds its own, then loaded beside it
        cpugemv.SOURCE = Path(path)
        kernels[path] = cpugemv._load()
        if kernels[path] is None:
            raise SystemExit(f"{path} could not be built (the log says why)")
    cpugemv.SOURCE = SOURCE

    def other(kernel, x: torch.Tensor) -> torch.Tensor:  # kernel None: the package's build
        gate, upv = cpugemv.linear(x, up, kernel).chunk(2, dim=-1)
        return cpugemv.linear(F.silu(gate) * upv, down, kernel)

    if cpugemv.available():
        maps = Path("/proc/self/maps").read_text().splitlines()
        runtimes = sorted({line.split()[-1] for line in maps if "gomp" in line or "iomp" in line})
        print("OpenMP runtimes loaded:", runtimes)
    with torch.no_grad():
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            read = host_read_gb_per_s(1 << 30, 5)
            print(f"threads {threads}: host read {read:.1f} GB/s")
            for n in [int(t) for t in args.tokens.split(",")]:
                start = time.perf_counter()
                up_p = torch.ops.mkldnn._reorder_linear_weight(up, n)
                down_p = torch.ops.mkldnn._reorder_linear_weight(down, n)
                pack_ms = (time.perf_counter() - start) * 1e3

                def packed(x: torch.Tensor, up_p: torch.Tensor = up_p, down_p: torch.Tensor = down_p) -> torch.Tensor:
                    gate, upv = linear(x, up_p).chunk(2, dim=-1)
                    return linear(F.silu(gate) * upv, down_p)

                x = torch.randn(n, h, dtype=torch.bfloat16)
                ref = plain(x)

                def native(x: torch.Tensor) -> torch.Tensor:
                    with torch.backends.mkldnn.flags(enabled=False):
                        return plain(x)

                variants = {"plain": plain, "native": native, "packed": packed}
                if cpugemv.available():
                    variants["own"] = functools.partial(other, None)  # the package's own build
                for path in args.source:
                    variants[Path(path).stem] = functools.partial(other, kernels[path])
                for name, fn in variants.items():
                    equal = torch.equal(fn(x), ref)
                    t = _times_ms(lambda fn=fn, x=x: fn(x), 7, lambda: None)
                    med = statistics.median(t)
                    print(
                        f"  n={n:<3} {name:<12} {med:7.2f} ms  {nbytes / med / 1e6:6.1f} GB/s  "
                        f"{nbytes / med / 1e6 / read:5.0%} of read  spread {(max(t) - min(t)) / med:4.0%}  "
                        f"equal {equal}" + (f"  (pack {pack_ms:.0f} ms)" if name == "packed" else "")
                    )
                if cuda and n in (1, 2, 4):
                    for name, fn in variants.items():
                        stream = torch.cuda.Stream()
                        done = torch.cuda.Event()
                        torch.cuda.synchronize()
                        with torch.cuda.stream(stream):
                            for k in range(24):
                                a, b = ring[k % 2]
                                slot[0].copy_(a, non_blocking=True)
                                slot[1].copy_(b, non_blocking=True)
                            done.record(stream)
                        t = []
                        while not done.query() or len(t) < 3:
                            s = time.perf_counter()
                            fn(x)
                            t.append((time.perf_counter() - s) * 1e3)
                        torch.cuda.synchronize()
                        med = statistics.median(t[:-1] or t)
                        print(f"  n={n:<3} {name + '+copy':<12} {med:7.2f} ms  {nbytes / med / 1e6:6.1f} GB/s")


if __name__ == "__main__":
    main()
