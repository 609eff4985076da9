"""The job spec: one pydantic model, mirrored key for key by `jobs/*.yaml`.

This module is the configuration's leaf: it imports pydantic and nothing of the engine, torch or
transformers, so that loading and validating a job (`fiddler-batch validate`) is quick. Everything that
runs a job reads its settings from here; the engine takes its own section (`EngineSpec`) as its settings.

Unknown keys are rejected everywhere, and so are non-finite numbers. Cross-field checks live in the model
validators below; checks that need the file system (does the input exist?) live in `fiddler_batch.jobfile`,
which also loads the YAML, resolves relative paths and applies command-line overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

InputFormatName = Literal["jsonl", "parquet", "openai"]
"""Formats requests can be read from (each has a reader in `fiddler_batch.io.readers.READERS`)."""
OutputFormatName = Literal["jsonl", "parquet", "openai"]
"""Formats results can be written in (each has a writer in `fiddler_batch.io.writers.WRITERS`)."""
InputFormat = Literal["auto", InputFormatName]
OutputFormat = Literal["auto", OutputFormatName]
CompressionName = Literal["gzip", "zstd"]
"""Whole-file compressions of JSONL input (Parquet compresses inside the file)."""

INPUT_SUFFIXES: dict[str, InputFormatName] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
OUTPUT_SUFFIXES: dict[str, OutputFormatName] = {".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSION_SUFFIXES: dict[str, CompressionName] = {".gz": "gzip", ".zst": "zstd"}

RemoteURL = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9+.-]*://")]
"""An fsspec URL (`s3://bucket/data/*.jsonl`, `hf://datasets/...`, `https://...`): kept as text, never resolved
against a folder."""
Location = RemoteURL | Path


def is_remote(location: Location | str) -> bool:
    """`location` is a URL read through fsspec rather than a local path."""
    return isinstance(location, str) and "://" in location


def file_name(location: Location | str) -> str:
    """The last component of a path or URL (a URL's query and fragment left out)."""
    text = str(location).split("?", 1)[0].split("#", 1)[0].rstrip("/")
    return text.rsplit("/", 1)[-1]


def compression_of(location: Location | str, declared: str = "auto") -> CompressionName | None:
    """The declared compression, else the one the name's last extension names (None: not compressed)."""
    if declared != "auto":
        return None if declared == "none" else declared  # type: ignore[return-value]
    return COMPRESSION_SUFFIXES.get(_suffix(file_name(location)))


def _suffix(name: str) -> str:
    return ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else ""


def input_format(path: Location | str, declared: str) -> InputFormatName | None:
    """The declared input format, else the one the file's extension names, under a compression extension
    (`data.jsonl.gz` is JSONL); None if unknown."""
    if declared != "auto":
        return declared  # type: ignore[return-value]
    name = file_name(path)
    if _suffix(name) in COMPRESSION_SUFFIXES:
        name = name[: -len(_suffix(name))]
    return INPUT_SUFFIXES.get(_suffix(name))


def output_format(path: Path, declared: str) -> OutputFormatName | None:
    """The declared output format, else the one the file's extension names (None if unknown)."""
    if declared != "auto":
        return declared  # type: ignore[return-value]
    return OUTPUT_SUFFIXES.get(path.suffix.lower())


def _config() -> ConfigDict:
    return ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


TOKENS_MAX = 2**31 - 1
"""Largest token count or token id a setting takes (what torch and the KV cache index with)."""
INT64_MAX = 2**63 - 1
"""Largest integer a setting takes: seeds feed torch generators and Parquet int64 columns."""
BEAMS_MAX = 64
"""Widest beam search: each beam is a row of its own, so a wider search would not fit any batch budget."""


class GenerationSpec(BaseModel):
    """How completions are generated. Every key may also be overridden per record by an input column."""

    model_config = _config()

    max_new_tokens: int = Field(64, ge=1, le=TOKENS_MAX)
    """Tokens to generate at most per request (the completion may end sooner, at EOS or a stop string)."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature. 0 means greedy decoding (the most likely token every step)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: sample among the most likely tokens whose probabilities add up to top_p. 1 keeps all."""
    top_k: int = Field(0, ge=0, le=TOKENS_MAX)
    """Sample among the top_k most likely tokens only. 0 keeps all."""
    min_p: float = Field(0.0, ge=0, le=1)
    """Sample only among tokens at least min_p times as likely as the most likely one. 0 keeps all."""
    num_beams: int = Field(1, ge=1, le=BEAMS_MAX)
    """Beam search width. 1 means no beam search. Beam search is deterministic: it takes no sampling settings
    (temperature, top_p, top_k, min_p, presence and frequency penalties), no n > 1, no logprobs, no
    stop_token_ids and no ignore_eos."""
    n: int = Field(1, ge=1, le=128)
    """Completions per prompt. Each has its own random stream (from the request's seed and the choice's index),
    so it does not depend on the batch; n > 1 needs temperature > 0."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings: generation ends when the completion contains one; the completion is cut before it."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Token ids that end a completion as EOS does (the token is kept in the token ids, left out of the text)."""
    ignore_eos: bool = False
    """Keep generating past EOS until max_new_tokens (stop strings and stop_token_ids still end a completion)."""
    min_tokens: int = Field(0, ge=0, le=TOKENS_MAX)
    """Tokens to generate at least: EOS and stop_token_ids are masked, and stop strings not looked for, until
    then."""
    repetition_penalty: float = Field(1.0, gt=0)
    """Penalty for every token already in the prompt or the completion (as transformers'
    RepetitionPenaltyLogitsProcessor: its logit is divided by the penalty when positive, multiplied when
    negative). 1 is off; above 1 discourages repeats."""
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    """Subtracted from the logit of every token that appears in the completion so far (as OpenAI and vLLM). 0 is
    off."""
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    """Subtracted from the logit of every token once per time it appears in the completion so far (as OpenAI and
    vLLM). 0 is off."""
    logprobs: bool = False
    """Add the log-probability of each generated token (log-softmax of the model's raw logits, before
    temperature and penalties) to the record."""
    top_logprobs: int = Field(0, ge=0, le=20)
    """With logprobs: also the top_logprobs most likely alternatives at each position, with theirs."""
    seed: int = Field(0, ge=0, le=INT64_MAX)
    """Sampling seed. Each request samples from its own random stream, seeded from this seed and the request's
    id (or from the record's own `seed` column), so its completion does not depend on the batch it lands in."""

    @field_validator(
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "num_beams",
        "n",
        "min_tokens",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "top_logprobs",
        "seed",
        mode="before",
    )
    @classmethod
    def _numbers_are_not_booleans(cls, value: object) -> object:
        if isinstance(value, bool):  # pydantic would read true as 1
            raise PydanticCustomError("bool_is_not_a_number", "true or false is not a number", {})
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise PydanticCustomError(
                "empty_stop", "an empty stop string would stop at once", {"fix": "remove the empty string from stop"}
            )
        return value

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _one_stop_token(cls, value: object) -> object:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids_are_ids(cls, value: list[int]) -> list[int]:
        if any(token < 0 for token in value):
            raise PydanticCustomError(
                "negative_token_id", "token ids are never negative", {"fix": "list token ids (0 or more)"}
            )
        if any(token > TOKENS_MAX for token in value):
            raise PydanticCustomError(
                "huge_token_id",
                "a token id above {most} is in no vocabulary",
                {"most": TOKENS_MAX, "fix": "list token ids of the model's vocabulary"},
            )
        return value

    @model_validator(mode="after")
    def _combinations(self) -> GenerationSpec:
        for check in (_beam_problem, _choices_problem, _length_problem, _logprobs_problem):
            problem = check(self)
            if problem is not None:
                raise problem
        return self

    @property
    def samples(self) -> bool:
        return self.temperature > 0

    @property
    def penalizes(self) -> bool:
        """Some penalty changes the logits."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _beam_problem(spec: GenerationSpec) -> PydanticCustomError | None:
    """Settings that make no sense with beam search, or that beam search cannot honour per request."""
    if spec.num_beams == 1:
        return None
    if spec.temperature > 0:
        return PydanticCustomError(
            "beams_with_sampling",
            "beam search (num_beams > 1) cannot sample (temperature > 0)",
            {"fix": "set temperature: 0 for beam search, or num_beams: 1 for sampling", "key": "num_beams"},
        )
    sampling = [
        name
        for name, off in (("top_p", 1.0), ("top_k", 0), ("min_p", 0.0))
        if getattr(spec, name) != off  # these shape sampling only: beam search would silently ignore them
    ]
    if sampling:
        return PydanticCustomError(
            "beams_with_sampling_settings",
            "beam search (num_beams > 1) does not sample, so {names} would have no effect",
            {"names": " and ".join(sampling), "fix": "remove them, or set num_beams: 1 to sample", "key": "num_beams"},
        )
    if spec.n > 1:
        return PydanticCustomError(
            "beams_with_n",
            "beam search (num_beams > 1) returns one completion per request, not n",
            {"fix": "set n: 1 for beam search, or num_beams: 1 and temperature > 0 for n samples", "key": "n"},
        )
    unsupported = [
        name for name in ("presence_penalty", "frequency_penalty", "logprobs") if getattr(spec, name)
    ]  # sampling penalties, and log-probabilities of one sequence among the beams'
    if unsupported:
        return PydanticCustomError(
            "beams_with_unsupported",
            "beam search (num_beams > 1) does not support {names}",
            {
                "names": " and ".join(unsupported),
                "fix": "remove them (repetition_penalty and min_tokens do work with beams), or set num_beams: 1",
                "key": "num_beams",
            },
        )
    per_batch = [name for name in ("stop_token_ids", "ignore_eos") if getattr(spec, name)]
    if per_batch:
        return PydanticCustomError(
            "beams_with_stop_tokens",
            "beam search (num_beams > 1) ends its beams at EOS for the whole batch: {names} cannot apply per request",
            {
                "names": " and ".join(per_batch),
                "fix": "use stop strings with beam search, or num_beams: 1",
                "key": "num_beams",
            },
        )
    return None


def _choices_problem(spec: GenerationSpec) -> PydanticCustomError | None:
    if spec.n > 1 and spec.temperature == 0:
        return PydanticCustomError(
            "greedy_choices",
            "n > 1 with temperature 0 gives n identical completions",
            {"fix": "set temperature > 0 to sample n different completions, or n: 1", "key": "n"},
        )
    return None


def _length_problem(spec: GenerationSpec) -> PydanticCustomError | None:
    if spec.min_tokens > spec.max_new_tokens:
        return PydanticCustomError(
            "min_above_max",
            "min_tokens ({min_tokens}) is above max_new_tokens ({max_new_tokens})",
            {
                "min_tokens": spec.min_tokens,
                "max_new_tokens": spec.max_new_tokens,
                "fix": "lower min_tokens or raise max_new_tokens",
                "key": "min_tokens",
            },
        )
    return None


def _logprobs_problem(spec: GenerationSpec) -> PydanticCustomError | None:
    if spec.top_logprobs > 0 and not spec.logprobs:
        return PydanticCustomError(
            "top_logprobs_without_logprobs",
            "top_logprobs asks for alternatives to log-probabilities that are not asked for",
            {"fix": "set logprobs: true as well, or top_logprobs: 0", "key": "top_logprobs"},
        )
    return None


GENERATION_KEYS = tuple(GenerationSpec.model_fields)


class InputSpec(BaseModel):
    """Where the requests come from: JSONL, Parquet or OpenAI batch files, one request per line or row."""

    model_config = _config()

    path: Location = Field(union_mode="left_to_right")
    """An input file, or a glob of files (`data/*.parquet`), local or remote: an fsspec URL (`s3://`, `gs://`,
    `hf://`, `https://`, ...) needs fsspec and the protocol's package. Relative paths are relative to the job
    file's folder."""
    format: InputFormat = "auto"
    """'jsonl', 'parquet' or 'openai' (OpenAI batch lines: custom_id, url, body); 'auto' picks by extension
    (.jsonl/.ndjson, .parquet/.pq), under a .gz or .zst extension."""
    compression: Literal["auto", "none", "gzip", "zstd"] = "auto"
    """Whole-file compression of JSONL and OpenAI input; 'auto' picks by extension (.gz gzip, .zst zstd, which
    needs the zstandard package)."""
    glob_order: Literal["sorted", "natural"] = "sorted"
    """Order of the files a glob matches: 'sorted' (by name, character by character) or 'natural' (numbers in
    names compared as numbers: part-2 before part-10)."""
    id_column: str = "id"
    """Column holding each request's id. Records without one get `FILE:LINE` (JSONL) or `FILE:ROW` (Parquet)."""
    prompt_column: str = "prompt"
    """Column holding a plain-text prompt (tokenized as is, with the tokenizer's special tokens)."""
    messages_column: str = "messages"
    """Column holding a chat conversation: a list of {role, content}, rendered with the tokenizer's chat
    template (content: a string, or a list of text parts). Each record has either a prompt or messages."""
    override_columns: list[str] = Field(default_factory=lambda: list(GENERATION_KEYS))
    """Columns that override generation settings per record when present and not null (names as in
    `generation`; in OpenAI batch input, the body's settings). [] ignores them all."""
    limit: int | None = Field(None, ge=1)
    """Run only the first `limit` records (in input order). null runs them all."""
    max_record_bytes: int = Field(16 * 2**20, ge=1024)
    """Longest JSONL line (and largest Parquet value) read, in bytes; a longer record is a bad record, skipped
    without being held in memory. Default 16 MiB."""

    _excluded: tuple[Path, ...] = PrivateAttr(default=())

    @property
    def excluded(self) -> tuple[Path, ...]:
        """Files and folders the job writes (output, errors, summary, work folder): never read as input, even
        when input.path's glob matches them (the job spec sets them)."""
        return self._excluded

    @field_validator("override_columns")
    @classmethod
    def _known_generation_keys(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in GENERATION_KEYS]
        if unknown:
            raise PydanticCustomError(
                "unknown_override",
                "not generation settings: {unknown}",
                {"unknown": ", ".join(unknown), "fix": f"list only names among {', '.join(GENERATION_KEYS)}"},
            )
        return value

    def may_override(self, *names: str) -> bool:
        """Records may set one of `names` themselves."""
        return any(name in self.override_columns for name in names)


class OutputSpec(BaseModel):
    """Where the results go: one record per request, in input order."""

    model_config = _config()

    path: Path
    """The results file (JSONL, Parquet or OpenAI batch output). Beside it the run writes `STEM.summary.json`,
    `STEM.errors.jsonl` and, while running, the work folder `STEM.parts/`. Relative paths are relative to the
    job file's folder."""
    format: OutputFormat = "auto"
    """'jsonl', 'parquet' or 'openai' (one OpenAI batch response line per request, keyed by custom_id); 'auto'
    picks by extension (.jsonl, .parquet)."""
    include_prompt: bool = False
    """Copy each request's prompt into its record (for chat records: the rendered conversation)."""
    include_token_ids: bool = False
    """Add the completion's token ids to each record."""
    include_columns: list[str] | Literal["all"] = Field(default_factory=list)
    """Input columns copied into each record's `columns` (labels, metadata), so no join is needed afterwards:
    a list of names (a name a record lacks gives null), 'all' for every column of the input record, or [] for
    none."""
    keep_parts: bool = False
    """Keep the work folder of per-batch part files after they are merged into the results file."""


SchedulerName = Literal["continuous", "static"]
"""How requests become forward passes (each name has its scheduler in `fiddler_batch.scheduling.SCHEDULERS`)."""

MIN_KV_CACHE_TOKENS = 65536
"""KV-cache tokens that 'auto' sizing always keeps, and what it means where memory is not planned (the CPU)."""


class BatchingSpec(BaseModel):
    """How requests are grouped into forward passes. A request too big for the budgets runs alone."""

    model_config = _config()

    scheduler: SchedulerName = "continuous"
    """'continuous': every step serves every request in flight (as many as the KV cache holds), finished ones
    are replaced at once, and long prompts are fed in chunks beside the decoding requests. 'static': the first
    version's batches, bucketed by kind and length, each run by transformers' generate until its longest
    request ends. Beam search always runs in static batches."""
    window: int = Field(1024, ge=1)
    """Requests read and tokenized together (static: bucketed together; larger windows make batches of more
    similar length)."""
    max_batch_size: int = Field(32, ge=1)
    """Requests per static batch at most."""
    max_rows: int | None = Field(None, ge=1)
    """Requests in flight at once at most under the continuous scheduler. null: as many as the KV cache holds."""
    max_prefill_tokens: int = Field(16384, ge=1)
    """Prompt tokens per forward pass at most: per step of the continuous scheduler (longer prompts are split
    into chunks), or per static batch counting padding (rows x longest prompt x num_beams)."""
    kv_cache_tokens: int | Literal["auto"] = Field("auto")
    """Tokens the KV cache holds. 'auto': on a GPU, everything the budget leaves after the non-expert weights,
    activations, staging slots and resident experts (capped by engine.resident_share), at least 65536; on the
    CPU, 65536. A request needs its prompt plus max_new_tokens; a static batch rows x (longest prompt + largest
    max_new_tokens) x num_beams."""
    prefill_heavy_ratio: float = Field(4.0, gt=0)
    """A request is prefill-heavy when prompt tokens >= prefill_heavy_ratio x max_new_tokens, else
    decode-heavy; a continuous step is prefill-heavy when its prompt tokens are at least this ratio times its
    decoding tokens. The engine picks the strategy of each batch or step from its kind."""

    @field_validator("kv_cache_tokens", mode="before")
    @classmethod
    def _count_or_auto(cls, value: object) -> object:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise PydanticCustomError(
            "kv_cache_tokens",
            "kv_cache_tokens must be a whole number >= 1 or 'auto' (got {value})",
            {"value": value, "fix": "give a number of tokens, or 'auto' to size it from the GPU's memory"},
        )


class ErrorsSpec(BaseModel):
    """What happens to bad input records."""

    model_config = _config()

    on_bad_record: Literal["skip", "fail"] = "skip"
    """'skip': list the record in the errors file and go on; 'fail': stop the job at the first bad record."""
    path: Path | None = None
    """The errors file (JSONL). Default: `STEM.errors.jsonl` beside the output."""


BatchKind = Literal["prefill_heavy", "decode_heavy"]
"""How the runner classifies a batch: most of its work is prompt processing, or most of it is decoding."""

StrategyName = Literal["balanced", "fiddler-rule", "cpu", "copy"]
"""How off-GPU experts are executed (each name has its behaviour in `fiddler_batch.engine.planner.STRATEGIES`).

- ``balanced``: per layer and step, the planner splits the off-GPU experts between CPU compute and
  copy-then-GPU so that the CPU, the PCIe link and the GPU finish together (the three work at once).
- ``fiddler-rule``: the paper's Algorithm 1. Per expert, the cheaper of CPU compute and copy plus GPU
  compute; CPU work and GPU work run one after the other.
- ``cpu``: every off-GPU expert is computed on the CPU (llama.cpp ``--cpu-moe`` style).
- ``copy``: every off-GPU expert is copied to the GPU and computed there.
"""

CpuPacked = Literal["auto", "on", "off"]
"""Whether experts computed on the CPU use weights packed for oneDNN (`engine.cpu_packed`)."""

CpuGemv = Literal["auto", "on", "off"]
"""Whether experts computed on the CPU use the project's own kernel at few tokens (`engine.cpu_gemv`)."""

AdaptCosts = Literal["auto", "on", "off"]
"""Whether the planner corrects the calibration by the times the run measures (`engine.adapt_costs`)."""

CpuLag = Literal["auto", "on", "off"]
"""Whether plans start the CPU as late after the link as the run measures (`engine.cpu_lag`)."""

ModelDType = Literal["auto", "float32", "bfloat16", "float16"]


class ModelSpec(BaseModel):
    """Which model to run."""

    model_config = _config()

    path: str
    """A local Hugging Face checkpoint directory, a hub id, or 'demo:tiny-mixtral' for the embedded demo model
    (tiny, random, built locally on first use: its text is noise)."""
    dtype: ModelDType = "auto"
    """Weight dtype; 'auto' keeps the checkpoint's."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""

    @field_validator("path")
    @classmethod
    def _non_empty_path(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError(
                "empty_model_path",
                "model.path is empty",
                {"fix": "give a checkpoint folder, a hub id or demo:tiny-mixtral"},
            )
        return value


class StrategyByKind(BaseModel):
    """Which strategy each kind of batch runs with."""

    model_config = _config()

    prefill_heavy: StrategyName = "balanced"
    """Strategy for batches dominated by prompt processing (long prompts)."""
    decode_heavy: StrategyName = "balanced"
    """Strategy for batches dominated by decoding (short prompts, long outputs)."""


DEFAULT_PREFETCH_EXPERTS = 1
"""engine.prefetch_experts when a job leaves it out: one expert of the next layer, in large steps only (prefills and
throughput batches; `prefetch_small_steps` off)."""


class EngineSpec(BaseModel):
    """Where the model's weights live and how mixture-of-experts layers are executed.

    Every field has a default that does the right thing on a machine with or without a GPU, so a job spec
    may leave the whole section out.
    """

    model_config = _config()

    device: str = "auto"
    """Fast device: 'auto' (the first CUDA GPU if there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'. With
    'cpu' everything runs on the CPU."""
    hybrid: bool = True
    """Run mixture-of-experts layers with the CPU-GPU hybrid executor. When false the whole model is placed on
    the fast device, which must hold it."""
    gpu_budget_gb: float | None = Field(None, gt=0)
    """GPU memory the engine may use, in GB (1e9 bytes). Default: what the card has free minus gpu_margin_gb."""
    gpu_margin_gb: float = Field(2.0, ge=0)
    """Memory left free on the card when gpu_budget_gb is not set, in GB."""
    resident_share: float | None = Field(None, ge=0, le=1)
    """Cap on the share (0 to 1) of all experts kept resident on the GPU; 0.25 keeps at most a quarter of
    them. Default: as many as the budget holds after non-expert weights, the KV cache, activations and staging
    slots. (Called `resident_experts` before version 0.2.)"""
    staging_slots: int = Field(4, ge=1, le=64)
    """GPU buffers, one expert each, that copied experts are staged in."""
    prefetch_experts: int = Field(DEFAULT_PREFETCH_EXPERTS, ge=0, le=63)
    """Experts of the next mixture-of-experts layer copied to the GPU ahead of it, per layer and step: the
    next layer's router applied to this layer's input guesses them, and the guessed off-GPU experts are copied
    into free staging slots (at most staging_slots - 1; none with one slot). A right guess is computed on the GPU
    as a resident expert; a wrong one costs link time, never a different token. In steps with as many tokens as
    the cost model's crossover or more (prefill, throughput batches; balanced and copy strategies) the experts
    that the next layer's plan copies for the guessed counts are copied, so that they travel while this layer's
    CPU experts and the next layer's attention run; in smaller steps (decode, beam search) only with
    prefetch_small_steps, the guessed experts with the most tokens. 0 turns it off."""
    prefetch_small_steps: bool = False
    """Prefetch (prefetch_experts) in steps with fewer tokens than the cost model's crossover too: decode and beam
    search steps, whose split experts already keep the link busy for nearly the whole step, so that a prefetched
    whole expert makes the link the bound (measured 0.62x and 0.90x as fast on an H200 host,
    benchmarks/NOTES.md)."""
    split_experts: bool = True
    """Let a layer split one off-GPU expert with few tokens between the CPU and the GPU when the cost model
    predicts a layer at least 5% shorter where the layer has at most two off-GPU experts, 20% where it has more
    (balanced strategy only): the CPU computes a share of its products from
    host memory, first of the up projection, then of the down one, and sends it to the GPU, which computes the
    rest from a partial copy (with `cpu_gemv`, the CPU's share from the own kernel at few tokens, as its whole
    experts). Every output number is the same as unsplit. Measured on H200 hosts against whole experts, 8 layers
    (benchmarks/NOTES.md), runs interleaved: single-request decode 1.03x with 25% of experts resident and 1.10x
    with 50%, beam search 1.01x and 1.09x; in a bench, one after the other: 0.98x and 1.19x, beam search 1.02x and
    1.12x; the 5% where a layer has two off-GPU experts, against 20% there, decode 0.99-1.06x on three hosts (25%
    resident). false keeps every expert whole."""
    cpu_worker: bool = False
    """Compute a layer's CPU experts on a worker thread while the main thread queues the rest of the step on
    the GPU (the layer's sum, the next layer's attention and router) behind a wait that the worker releases, so
    that the host's launch time overlaps the CPU experts instead of following them. Needs a CUDA driver that can
    make a stream wait on host memory (CUDA 11.7 or later); elsewhere the CPU experts run on the calling thread.
    A split expert's CPU share runs on the worker too. Tokens are the same either way. Off by default: on H200
    hosts the CPU experts ran 10-25% slower on the worker thread, and in a timeline a split's share started later
    and ran 1.7x slower, which cancelled the overlap (single-request decode 1.01-1.03x, beam search 0.96-1.03x,
    benchmarks/NOTES.md)."""
    cuda_graphs: bool = True
    """Run decode steps as CUDA graphs around the experts calls: each layer's attention, norms and router are
    captured once per batch and replayed with one launch, where transformers' Python code takes the host 1-2 ms
    per layer to launch them while the GPU waits. Batches of 4 or more new tokens then use transformers' static
    KV cache (allocated for the prompt and every new token when the batch starts). The graphs launch the same
    kernels on the same shapes, so tokens are the same as with the static cache without graphs. On an H200
    host: single-request decode 1.13x, beam search 1.09x, time to first token within 1.3% (benchmarks/NOTES.md).
    GPU only; models whose static cache is not made of plain full-attention layers (sliding-window,
    linear-attention or indexed layers), or whose code cannot be captured, decode without graphs, on the
    dynamic cache."""
    expert_graphs: bool = True
    """Queue the GPU's part of the experts of a small layer call (at most 16 token slots: tokens x experts per token)
    as CUDA graphs: each expert computed whole on the GPU (resident, prefetched or copied), and a split expert's GPU
    share before and after the CPU's columns arrive, is captured once per expert (or staging slot and share) and
    rows, over buffers the call keeps at fixed addresses, and replayed with one launch. At one token the host takes
    about 0.13 ms to launch a resident expert kernel by kernel and 0.005 ms to replay it (H200 host,
    `benchmarks/launch_probe.py`), time that in a decode layer comes before or after its CPU share. The same kernels
    on the same shapes: tokens are the same. Measured on H200 hosts against launching them one by one (runs
    interleaved, ratios of medians): single-request decode 1.01-1.07x at 8 layers and 1.02-1.04x at 32 layers, beam
    search 1.01-1.04x at 8 layers and 1.11x at 32 layers with 50% resident (one host, where the graphs were still
    captured 280-450 times a run); small gains within the hosts' run-to-run spread but for the last
    (benchmarks/NOTES.md). GPU only; a capture that fails turns them off with one log line."""
    cpu_packed: CpuPacked = "off"
    """Compute CPU experts from a second copy of their up and down weights packed once for oneDNN (bf16 weights
    only). 'auto' packs when the calibration measured the packed expert at least 10% faster at some token count the
    CPU takes (up to the crossover, where copying starts to win) and host memory keeps a tenth of itself (at least 4
    GiB) free after the packed copies; each CPU expert is then computed with whichever layout the calibration
    measured faster at its token count, and the planner plans with those times. 'on' packs whatever memory and the
    calibration say and always computes from the packed copy. The packed copies take as much host memory as the host
    experts. Off by default: which layout is faster changed from one H200 host to the next (packed 1.4x faster at
    2-32 tokens in one call, 1.0-1.4x slower at 1-32 tokens in the next four), and a packed product may differ from
    the plain one in its last bits (benchmarks/NOTES.md). A calibration made by an earlier version has no packed
    times: 'auto' then does not pack until `fiddler-batch calibrate` runs again."""
    cpu_gemv: CpuGemv = "auto"
    """Compute CPU experts with few tokens (up to 32) with the project's own matrix-vector kernel: bf16 weights as
    stored, read once, summed in float32 (`engine/gemv.c`, compiled for the host's CPU with its C compiler and
    OpenMP on first use, into the cache folder). 'auto' uses it at each token count where the calibration measured
    it faster than the other ways (the planner plans with those times), except where cpu_packed 'on' asks for
    packed weights; 'on' at every count up to 32; 'off' never. Where the kernel cannot be built (no C compiler)
    experts use `F.linear`, and the log says why. A product from the kernel may differ from `F.linear`'s in its
    last bits, as the CPU's bits already differ from the GPU's. Its threads take the rows in chunks as they finish
    one, so none waits for the slowest. On H200 hosts' 16-core Xeons a Mixtral expert at one token took 2.8-4.5 ms
    against 3.9-7.2 ms with `F.linear`; single-request decode ran 1.13-1.27x faster, beam search 1.06-1.19x, and
    taking rows in chunks rather than a fixed share per thread made them 1.16-1.29x faster again
    (benchmarks/NOTES.md). A cached calibration from an earlier version, which has no times
    for it, is measured again (quickly) by the first run that would use it; an `engine.calibration` file is not:
    run `fiddler-batch calibrate` again."""
    adapt_costs: AdaptCosts = "off"
    """Correct the calibrated cost model while the job runs: the executor compares each layer call's CPU experts and
    copies with the times the model predicted, and the planner plans with the model scaled by the ratios (CPU alone
    and beside copies, copies alone and beside the CPU; recent layer calls weigh most). The calibration measures
    for seconds on an idle host, a job runs for hours beside other work: on one H200 host a 32-layer decode's CPU
    experts took 1.5x their calibrated time, on another a 32-layer prefill's 1.3-1.5x. 'on' adapts (with a GPU
    and on the CPU alike); 'auto' adapts with a GPU only; 'off' plans on the calibration as it is. Off by default:
    on the hosts measured since it followed the hosts' minute-to-minute drift and gained nothing (32-layer decode
    0.96x, beam search 1.00x; 8 layers 0.97x and 1.02x, benchmarks/NOTES.md). Plans then depend on the run's
    timings; in float32 every plan gives the same tokens, in bf16 a CPU product may differ from a GPU one in its last
    bits. `engine_stats.cost_scales` gives the ratios at the end of each batch."""
    cpu_lag: CpuLag = "auto"
    """Plan each layer with its CPU work starting as late after the link's copies as it does in this run. The link
    starts a layer's first copy at once; the CPU starts after the host has queued the layer's GPU work and sent it
    its rows, on H200 hosts 0.55-0.95 ms later (an eighth to a quarter of a one-token expert's CPU time). The
    executor measures that delay over 64 layer calls with both (decode-sized calls and prefill-sized ones apart),
    after leaving out one forward pass of each (a process's first calls of a kind can start the CPU far later),
    fixes the median for the engine's life, and the planner then gives the link a larger share of a split
    expert, or one more copy, where the CPU would finish last. 'auto' measures with a GPU only; 'on' on the CPU too
    (the tests); 'off' plans as if both started together. Against 'off', interleaved on one H200 host at 8 layers:
    single-request decode 1.04x and beam search 1.04x with 50% of experts resident, 1.01x and 1.01x with 25%
    (benchmarks/NOTES.md). Plans then depend on the delay measured; in float32 every plan gives the same tokens, in
    bf16 a CPU product may differ from a GPU one in its last bits. `engine_stats.cpu_lag` gives the values in use,
    and the median of the calls left out."""
    cpu_threads: int | None = Field(None, ge=1)
    """Threads for experts computed on the CPU. Default: the physical cores."""
    strategy: StrategyByKind = Field(default_factory=StrategyByKind)
    """Execution strategy for each kind of batch."""
    calibration: Path | None = None
    """Cost-model file written by `fiddler-batch calibrate`. Default: the cache entry for this machine, model
    geometry and dtype; measured quickly on first use when there is none."""
    profile: Path | None = None
    """Expert-popularity file written by `fiddler-batch profile`. Resident experts are the most popular ones;
    without a profile they are spread evenly across layers."""

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: object) -> object:
        if isinstance(data, dict) and "resident_experts" in data:
            raise PydanticCustomError(
                "renamed_key",
                "engine.resident_experts was renamed engine.resident_share (a share of all experts, 0 to 1)",
                {"fix": "write resident_share: with the same value", "key": "resident_experts"},
            )
        return data

    @field_validator("cpu_packed", "cpu_gemv", "adapt_costs", "cpu_lag", mode="before")
    @classmethod
    def _packed_switch(cls, value: object) -> object:
        """YAML reads a bare on / off (and true / false) as a boolean."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda"):
            return value
        if value.startswith("cuda:") and value[5:].isdigit():
            return value
        raise PydanticCustomError(
            "unknown_device",
            "unknown device {device!r}",
            {"device": value, "fix": "use 'auto', 'cpu', 'cuda' or 'cuda:N'"},
        )

    @model_validator(mode="after")
    def _prefetch_fits_the_slots(self) -> EngineSpec:
        # The default prefetch (one expert) is simply off with one staging slot; a number asked for must fit.
        asked = "prefetch_experts" in self.model_fields_set
        if asked and self.prefetch_experts and self.prefetch_experts >= self.staging_slots:
            raise PydanticCustomError(
                "prefetch_over_slots",
                "prefetch_experts ({prefetch}) must stay below staging_slots ({slots}): prefetches hold at most all "
                "staging slots but one",
                {
                    "prefetch": self.prefetch_experts,
                    "slots": self.staging_slots,
                    "fix": f"set staging_slots: {self.prefetch_experts + 1} or more, or prefetch_experts: "
                    f"{max(self.staging_slots - 1, 0)} or less",
                    "key": "prefetch_experts",
                },
            )
        return self


class JobSpec(BaseModel):
    """A batch-inference job: which model, which requests, where the results go and how they are generated."""

    model_config = _config()

    model: ModelSpec
    """The model to run."""
    input: InputSpec
    """The requests."""
    output: OutputSpec
    """The results."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    """Default generation settings (records may override them)."""
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    """Batch sizing."""
    errors: ErrorsSpec = Field(default_factory=ErrorsSpec)
    """Bad-record handling."""
    engine: EngineSpec = Field(default_factory=EngineSpec)
    """Engine settings: devices, GPU memory budget and expert execution strategy."""

    @model_validator(mode="after")
    def _check_outputs(self) -> JobSpec:
        if output_format(self.output.path, self.output.format) is None:
            raise PydanticCustomError(
                "output_format",
                "cannot tell the output format from the extension of {path}",
                {
                    "path": str(self.output.path),
                    "key": "output.path",
                    "fix": "end output.path with .jsonl or .parquet, or set output.format",
                },
            )
        if self.output.path == self.input.path:
            raise PydanticCustomError(
                "output_is_input",
                "output.path is the input file",
                {"key": "output.path", "fix": "write the results to another file"},
            )
        if self.errors.path is not None and self.errors.path == self.input.path:
            raise PydanticCustomError(
                "errors_is_input",
                "errors.path is the input file: writing the errors file would destroy the input",
                {"key": "errors.path", "fix": "write the errors to another file, or leave errors.path out"},
            )
        if self.errors.path is not None and self.errors.path in (self.output.path, self.summary_path):
            raise PydanticCustomError(
                "errors_is_output",
                "errors.path is the results or the summary file",
                {"key": "errors.path", "fix": "write the errors to another file, or leave errors.path out"},
            )
        return self

    @model_validator(mode="after")
    def _input_never_reads_output(self) -> JobSpec:
        self.input._excluded = tuple(self.written_paths) + (self.work_dir,)
        return self

    @property
    def written_paths(self) -> list[Path]:
        """The files a run writes beside its work folder: results, errors and summary."""
        return [self.output.path, self.errors_path, self.summary_path]

    @property
    def output_format(self) -> OutputFormatName:
        return output_format(self.output.path, self.output.format) or "jsonl"

    @property
    def stem(self) -> Path:
        """The output path without its extension: the base of the summary, errors and work-folder names."""
        return self.output.path.with_suffix("")

    @property
    def errors_path(self) -> Path:
        return self.errors.path or self.stem.with_name(self.stem.name + ".errors.jsonl")

    @property
    def summary_path(self) -> Path:
        return self.stem.with_name(self.stem.name + ".summary.json")

    @property
    def work_dir(self) -> Path:
        return self.stem.with_name(self.stem.name + ".parts")
