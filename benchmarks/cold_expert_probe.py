"""The CPU expert on weights it read a moment ago against weights it has not read for a while.

    python benchmarks/cold_expert_probe.py [--experts 8] [--threads 16] [--tokens 1,4] [--memory plain,huge]
        [--constant]

The calibration times one expert several times in a row; the engine computes a different expert each time (other
layers' and other experts' weights come between two uses of one expert). Where the host's last-level cache holds a
good part of an expert (352 MB for Mixtral), the first is faster than the second. This probe puts `--experts`
random Mixtral experts in one host tensor per projection, as the engine holds a layer's experts (pinned in place
when there is a GPU), and times, at each token count, for `F.linear` (`plain`) and the project's own kernel
(`own`):

- `warm`: one expert again and again (how calibrations timed it before they read experts in turn), median of 7
  after 2 untimed;
- `cold`: the experts in turn, three rounds, median of the timed calls;
- `cold+copy` (with a GPU): the same while the link copies other experts to the GPU in a loop.

It does so for the memory as PyTorch allocates it and, where the kernel offers transparent huge pages, for memory
advised to use them (`madvise(MADV_HUGEPAGE)` before the first touch, then pinned in place), and prints the
host's cache sizes, the huge-page setting and how much of each allocation huge pages back. With many experts
(`--experts 160 --constant`: 56 GB, as much as a 32-layer Mixtral keeps on the host) the page tables of 4 KiB
pages no longer fit the caches beside the weights.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from fiddler_batch.engine import cpugemv
from fiddler_batch.engine.memory import pin_in_place

MADV_HUGEPAGE = 14
HUGE = 2 << 20


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def host_facts() -> None:
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        caches.append(f"L{_read(f'{index}/level')} {_read(f'{index}/type')} {_read(f'{index}/size')}")
    print("caches of cpu0:", ", ".join(caches))
    print("transparent huge pages:", _read("/sys/kernel/mm/transparent_hugepage/enabled"))
    print(
        "model name:",
        next(
            (ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines() if ln.startswith("model name")),
            "?",
        ),
    )


def anon_huge_kb() -> int:
    for line in _read("/proc/self/smaps_rollup").splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def allocate(shape: tuple[int, ...], huge: bool) -> torch.Tensor:
    """An untouched bf16 tensor; `huge`: its pages advised to be huge before the first touch."""
    numel = 1
    for d in shape:
        numel *= d
    if not huge:
        return torch.empty(shape, dtype=torch.bfloat16)
    raw = torch.empty(numel * 2 + HUGE, dtype=torch.uint8)
    start = (raw.data_ptr() + HUGE - 1) // HUGE * HUGE
    length = (numel * 2) // HUGE * HUGE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(start, length, MADV_HUGEPAGE) != 0:
        print("  madvise failed, errno", ctypes.get_errno())
    offset = start - raw.data_ptr()
    return raw[offset : offset + numel * 2].view(torch.bfloat16).view(shape)


def measure(up: torch.Tensor, down: torch.Tensor, tokens: list[int], slot: tuple[torch.Tensor, ...] | None) -> None:
    """Print warm, cold and cold+copy times of each way at each token count for the experts in up and down."""
    e, h = up.shape[0], up.shape[2]
    nbytes = (up[0].numel() + down[0].numel()) * 2
    cuda = slot is not None

    def plain(x: torch.Tensor, k: int) -> torch.Tensor:
        gate, upv = F.linear(x, up[k]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * upv, down[k])

    def own(x: torch.Tensor, k: int) -> torch.Tensor:
        gate, upv = cpugemv.linear(x, up[k]).chunk(2, dim=-1)
        return cpugemv.linear(F.silu(gate) * upv, down[k])

    ways = {"plain": plain, "own": own} if cpugemv.available() else {"plain": plain}
    for n in tokens:
        x = torch.randn(n, h, dtype=torch.bfloat16)
        for name, fn in ways.items():
            for _ in range(2):
                fn(x, 0)
            warm = []
            for _ in range(7):
                s = time.perf_counter()
                fn(x, 0)
                warm.append((time.perf_counter() - s) * 1e3)
            cold = []
            for _ in range(3):
                for k in range(1, e):
                    s = time.perf_counter()
                    fn(x, k)
                    cold.append((time.perf_counter() - s) * 1e3)
            line = (
                f"  n={n:<3} {name:<6} warm {statistics.median(warm):6.2f} ms "
                f"({nbytes / statistics.median(warm) / 1e6:5.1f} GB/s)  cold {statistics.median(cold):6.2f} ms "
                f"({nbytes / statistics.median(cold) / 1e6:5.1f} GB/s, {min(cold):.2f}-{max(cold):.2f})"
            )
            if cuda:
                stream, done = torch.cuda.Stream(), torch.cuda.Event()
                torch.cuda.synchronize()
                with torch.cuda.stream(stream):
                    for k in range(min(3 * e, 24)):
                        slot[0].copy_(up[k % e], non_blocking=True)
                        slot[1].copy_(down[k % e], non_blocking=True)
                    done.record(stream)
                busy, k = [], 1
                while not done.query() or len(busy) < 3:
                    s = time.perf_counter()
                    fn(x, k)
                    busy.append((time.perf_counter() - s) * 1e3)
                    k = k % (e - 1) + 1
                torch.cuda.synchronize()
                line += f"  cold+copy {statistics.median(busy[:-1] or busy):6.2f} ms"
            print(line)
    if cuda:  # copy rate from this memory
        torch.cuda.synchronize()
        s = time.perf_counter()
        for k in range(e):
            slot[0].copy_(up[k], non_blocking=True)
            slot[1].copy_(down[k], non_blocking=True)
        torch.cuda.synchronize()
        print(f"  copy {e * nbytes / (time.perf_counter() - s) / 1e9:.1f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokens", default="1,4")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--memory", default="plain,huge", help="which memory: plain (as allocated), huge, or both")
    parser.add_argument("--constant", action="store_true", help="fill with one value (fast for many experts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    host_facts()
    h, i, e = args.hidden, args.intermediate, args.experts
    cuda = torch.cuda.is_available()
    slot = (
        (
            torch.empty(2 * i, h, dtype=torch.bfloat16, device="cuda"),
            torch.empty(h, i, dtype=torch.bfloat16, device="cuda"),
        )
        if cuda
        else None
    )
    nbytes = (2 * i * h + h * i) * 2
    with torch.no_grad():
        for huge in [kind == "huge" for kind in args.memory.split(",")]:
            before = anon_huge_kb()
            start = time.perf_counter()
            up, down = allocate((e, 2 * i, h), huge), allocate((e, h, i), huge)
            for t in (up, down):
                t.fill_(0.01) if args.constant else t.uniform_(-0.05, 0.05)
            fill_s = time.perf_counter() - start
            backed = (anon_huge_kb() - before) * 1024 / (up.numel() + down.numel()) / 2
            if cuda and not huge:
                up, down = pin_in_place(up), pin_in_place(down)
            print(
                f"memory {'huge-page advised' if huge else 'as allocated'}: {e} experts, {e * nbytes / 1e9:.1f} GB, "
                f"filled in {fill_s:.1f} s, {backed:.0%} backed by huge pages, pinned {up.is_pinned()}"
            )
            if cuda and not up.is_pinned():  # an offset view cannot register in place: register the pages
                for t in (up, down):
                    ptr = t.data_ptr() // 4096 * 4096
                    err = torch.cuda.cudart().cudaHostRegister(ptr, t.numel() * 2 + t.data_ptr() - ptr, 0)
                    print("  registered in place, error", int(err))

            measure(up, down, [int(t) for t in args.tokens.split(",")], slot)
            del up, down


if __name__ == "__main__":
    main()
