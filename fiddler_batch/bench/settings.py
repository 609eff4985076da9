"""What one benchmark run measures: scenarios and their sizes, baselines, the model variant, repetitions.

Scenarios (benchmarks/PROTOCOL.md): (a) single-request decode, (b) long prefill, (c) beam search, (d) offline
throughput through the job runner. A `Case` is one scenario at one size. Sizes are written as on the command
line: a `32x64` (prompt x new tokens), b `1024` (prompt tokens), c `4` (beam width; prompt 32, 64 new tokens),
d `256` (requests).
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SCENARIOS = ("a", "b", "c", "d")
SCENARIO_TITLES = {
    "a": "single-request decode",
    "b": "long prefill",
    "c": "beam search",
    "d": "offline throughput (job runner)",
}


@dataclass(frozen=True)
class Baseline:
    """One way of placing and running the benchmark model under the shared GPU budget."""

    name: str
    placement: str
    """'accelerate' (transformers + accelerate's device_map) or 'engine' (fiddler-batch's engine)."""
    strategy: str | None
    """The engine strategy every batch runs with (None: the engine's defaults)."""
    resident: bool
    """Keeps the budget's share of experts resident on the GPU (False: none, every expert off the GPU)."""
    slow: bool
    """So slow (seconds per token) that it runs shortened: fewer tokens, requests and repetitions."""
    description: str
    engine: dict[str, Any] = field(default_factory=dict)
    """EngineSpec settings over the engine's defaults (an engine placement only)."""
    by_default: bool = True
    """Runs when `--baselines` is not given (variants of ours that measure one setting run only when named)."""


def _variant(name: str, description: str, engine: dict[str, Any]) -> Baseline:
    """A variant of ours: the engine with its defaults but `engine`'s settings, resident experts as the budget
    allows, run only when `--baselines` names it."""
    return Baseline(name, "engine", None, True, False, description, engine=engine, by_default=False)


BASELINE_TABLE: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline(
            "accelerate",
            "accelerate",
            None,
            True,
            True,
            "transformers + accelerate, device_map='auto' with max_memory capped to the budget",
        ),
        Baseline(
            "cpu-experts",
            "engine",
            "cpu",
            False,
            False,
            "every expert computed on the CPU, everything else on the GPU (llama.cpp --cpu-moe style)",
        ),
        Baseline(
            "fiddler-rule",
            "engine",
            "fiddler-rule",
            True,
            False,
            "the paper's Algorithm 1: per expert the cheaper of CPU and copy + GPU, one after the other",
        ),
        Baseline("fiddler-batch", "engine", None, True, False, "fiddler-batch's engine with its default settings"),
        _variant(
            "fiddler-prefetch",
            "fiddler-batch's defaults with the next layer's 2 likeliest off-GPU experts prefetched in decode steps too",
            {"prefetch_experts": 2, "prefetch_small_steps": True},
        ),
        _variant(
            "fiddler-whole",
            "fiddler-batch's defaults with every expert kept whole, none split between the CPU and the GPU "
            "(engine.split_experts: false)",
            {"split_experts": False},
        ),
        _variant(
            "fiddler-worker",
            "fiddler-batch's defaults with the CPU experts on a worker thread while the main thread queues the "
            "rest of the step behind a stream wait for them (engine.cpu_worker: true)",
            {"cpu_worker": True},
        ),
        _variant(
            "fiddler-eager",
            "fiddler-batch's defaults with decode steps launched eagerly from transformers' code, on its dynamic "
            "KV cache, instead of replayed as CUDA graphs (engine.cuda_graphs: false)",
            {"cuda_graphs": False},
        ),
        _variant(
            "fiddler-packed",
            "fiddler-batch's defaults with CPU experts computed from weights packed for oneDNN where the calibration "
            "measured that faster (engine.cpu_packed: auto)",
            {"cpu_packed": "auto"},
        ),
        _variant(
            "fiddler-linear",
            "fiddler-batch's defaults with every CPU expert computed by F.linear (oneDNN), never by the project's own "
            "kernel (engine.cpu_gemv: off)",
            {"cpu_gemv": "off"},
        ),
        _variant(
            "fiddler-adapt",
            "fiddler-batch's defaults with the planner's times corrected by the times the run measures "
            "(engine.adapt_costs: on)",
            {"adapt_costs": "on"},
        ),
        _variant(
            "fiddler-prefetch-1",
            "fiddler-batch's defaults with the next layer's likeliest off-GPU expert prefetched in decode steps too",
            {"prefetch_experts": 1, "prefetch_small_steps": True},
        ),
        _variant(
            "fiddler-noprefetch",
            "fiddler-batch's defaults with no expert prefetched, in prefills and throughput batches either "
            "(engine.prefetch_experts: 0)",
            {"prefetch_experts": 0},
        ),
    )
}
BASELINES = tuple(BASELINE_TABLE)
DEFAULT_BASELINES = tuple(name for name, b in BASELINE_TABLE.items() if b.by_default)
OURS = "fiddler-batch"


@dataclass(frozen=True)
class Case:
    """One scenario at one size."""

    scenario: str
    prompt: int = 0  # a, b, c: prompt tokens
    new: int = 1  # a, c: tokens to generate (b: the first token only)
    width: int = 1  # c: beams
    requests: int = 0  # d: requests in the job

    @property
    def label(self) -> str:
        if self.scenario == "a":
            return f"{self.prompt}x{self.new}"
        if self.scenario == "b":
            return str(self.prompt)
        if self.scenario == "c":
            return f"w{self.width}"
        return f"{self.requests}req"

    def describe(self) -> str:
        if self.scenario == "a":
            return f"prompt {self.prompt}, {self.new} new tokens, greedy, batch 1"
        if self.scenario == "b":
            return f"prompt {self.prompt}, time to the first token"
        if self.scenario == "c":
            return f"beam width {self.width}, prompt {self.prompt}, {self.new} new tokens"
        return f"{self.requests} requests of mixed length through the job runner"


@dataclass(frozen=True)
class Mix:
    """The request mix of scenario d: short chat-like conversations with, every `doc_every`-th request,
    a long plain-text document. Lengths are in words, one token each (plus 3 chat-template tokens, or the
    BOS token of a plain prompt); each range is drawn uniformly, seeded."""

    chat_words: tuple[int, int] = (8, 40)
    chat_new: int = 16
    doc_every: int = 64
    doc_words: tuple[int, int] = (512, 1024)
    doc_new: int = 16


# Beam search runs at the paper's prompt and output length.
BEAM_PROMPT, BEAM_NEW = 32, 64

PROTOCOL_SIZES: dict[str, tuple[Case, ...]] = {
    "a": tuple(Case("a", prompt=p, new=n) for p in (32, 64, 128, 256) for n in (64, 128, 256, 512)),
    "b": tuple(Case("b", prompt=p) for p in (512, 1024, 2048, 4096)),
    "c": tuple(Case("c", prompt=BEAM_PROMPT, new=BEAM_NEW, width=w) for w in (4, 8, 12, 16)),
    "d": (Case("d", requests=256),),
}
"""Every size benchmarks/PROTOCOL.md lists (`--sizes full`)."""

DEFAULT_SIZES: dict[str, tuple[Case, ...]] = {
    "a": (Case("a", prompt=32, new=64),),
    "b": (Case("b", prompt=1024),),
    "c": (Case("c", prompt=BEAM_PROMPT, new=BEAM_NEW, width=4),),
    "d": (Case("d", requests=256),),
}
"""One size per scenario: the reference points of DESIGN.md."""

SMOKE_SIZES: dict[str, tuple[Case, ...]] = {
    "a": (Case("a", prompt=8, new=8),),
    "b": (Case("b", prompt=64),),
    "c": (Case("c", prompt=8, new=8, width=2),),
    "d": (Case("d", requests=16),),
}
SMOKE_MIX = Mix(chat_words=(4, 12), chat_new=4, doc_every=8, doc_words=(48, 96), doc_new=4)


def parse_size(scenario: str, text: str) -> Case:
    """One size of `scenario` as written on the command line."""
    text = text.strip().lower()
    try:
        if scenario == "a":
            prompt, new = text.split("x")
            return Case("a", prompt=_positive(prompt), new=_positive(new))
        if scenario == "b":
            return Case("b", prompt=_positive(text))
        if scenario == "c":
            return Case("c", prompt=BEAM_PROMPT, new=BEAM_NEW, width=_positive(text.removeprefix("w")))
        if scenario == "d":
            return Case("d", requests=_positive(text.removesuffix("req")))
    except ValueError:
        pass
    examples = {"a": "32x64", "b": "1024", "c": "4", "d": "256"}
    raise ValueError(f"cannot read size {text!r} of scenario {scenario}: write it like {examples[scenario]}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def parse_sizes(specs: tuple[str, ...], base: dict[str, tuple[Case, ...]]) -> dict[str, tuple[Case, ...]]:
    """Sizes per scenario from `--sizes` values: 'full' (every protocol size), 'a=all', 'a=32x64,128x128'.
    Scenarios not named keep `base`."""
    sizes = dict(base)
    for spec in specs:
        if spec.strip().lower() == "full":
            sizes.update(PROTOCOL_SIZES)
            continue
        scenario, sep, values = spec.partition("=")
        scenario = scenario.strip().lower()
        if not sep or scenario not in SCENARIOS:
            raise ValueError(
                f"cannot read --sizes {spec!r}: write SCENARIO=SIZE[,SIZE...] (e.g. a=32x64,128x128) or 'full'"
            )
        if values.strip().lower() == "all":
            sizes[scenario] = PROTOCOL_SIZES[scenario]
        else:
            sizes[scenario] = tuple(parse_size(scenario, v) for v in values.split(",") if v.strip())
    return sizes


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on; recorded in the results."""

    scenarios: tuple[str, ...] = SCENARIOS
    sizes: dict[str, tuple[Case, ...]] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    geometry: str = "mixtral-8x7b"  # or "tiny"
    layers: int = 8
    resident: float = 0.25  # share of expert weights resident on the GPU
    skew: float = 0.0  # Zipf exponent of the router offsets; 0 = near-uniform routing
    seed: int = 0
    device: str = "auto"
    staging_slots: int = 4
    cpu_threads: int | None = None  # threads for CPU experts (None: the engine's default, the physical cores)
    reps: int = 3
    slow_reps: int = 1
    slow_max_new: int = 8  # tokens generated at most by a slow baseline (a, c, d)
    slow_requests: int = 64  # requests of scenario d run by a slow baseline (the first ones: one document)
    mix: Mix = Mix()
    calibration: Path | None = None  # a saved cost model to use instead of calibrating

    def cases(self) -> list[Case]:
        return [case for scenario in self.scenarios for case in self.sizes.get(scenario, ())]

    @property
    def variant(self) -> str:
        """Names the model variant: results of different variants are never compared."""
        routing = "uniform" if self.skew == 0 else f"skew {self.skew:g}"
        name = "" if self.geometry == "mixtral-8x7b" else f"{self.geometry} "
        return f"{name}{self.layers}L, {self.resident:.0%} resident, {routing}"

    def command_line(self) -> str:
        """The command that runs these settings again."""
        args = ["fiddler-batch", "bench", *(["--smoke"] if self.geometry == "tiny" else [])]
        args += ["--scenario", ",".join(self.scenarios)]
        for scenario in self.scenarios:
            args += ["--sizes", f"{scenario}=" + ",".join(c.label for c in self.sizes.get(scenario, ()))]
        args += [
            "--baselines",
            ",".join(self.baselines),
            "--layers",
            str(self.layers),
            "--resident",
            f"{self.resident:g}",
            "--skew",
            f"{self.skew:g}",
            "--seed",
            str(self.seed),
            "--reps",
            str(self.reps),
            "--slow-reps",
            str(self.slow_reps),
            "--slow-max-new",
            str(self.slow_max_new),
            "--slow-requests",
            str(self.slow_requests),
            "--device",
            self.device,
            "--staging-slots",
            str(self.staging_slots),
        ]
        if self.cpu_threads:
            args += ["--cpu-threads", str(self.cpu_threads)]
        if self.calibration:
            args += ["--calibration", str(self.calibration)]
        return shlex.join(args)

    def to_json(self) -> dict:
        data = asdict(self)
        data["sizes"] = {s: [c.label for c in self.sizes.get(s, ())] for s in self.scenarios}
        data["calibration"] = str(self.calibration) if self.calibration else None
        data["variant"] = self.variant
        data["command"] = self.command_line()
        return data


def smoke_settings(settings: Settings) -> Settings:
    """The CPU smoke run: tiny geometry, 2 layers, the CPU as the fast device with one thread (steady on small
    shared machines), tiny sizes, one repetition."""
    return replace(
        settings,
        geometry="tiny",
        layers=2,
        device="cpu",
        cpu_threads=1,
        reps=1,
        sizes=dict(SMOKE_SIZES),
        mix=SMOKE_MIX,
        slow_max_new=4,
        slow_requests=8,
    )
