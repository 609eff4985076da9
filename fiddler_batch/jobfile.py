"""Loading a job: YAML file, relative paths, command-line overrides, validation, clear errors.

Precedence: command line (`--set KEY=VALUE` and the options that stand for keys) > YAML file > defaults.
Relative paths written in the YAML file are relative to the YAML file's folder, so a job behaves the same
whatever folder cron or Slurm starts it from; relative paths given on the command line are relative to the
current folder, as usual for command-line arguments. `model.path` counts as a local folder when it exists
there or starts with `.`, `/` or `~`; otherwise it is a hub id.

Paths (every key typed as a path, and `model.path`) may hold environment variables: `$NAME`, `${NAME}`,
`${NAME:-default}` (the default when NAME is unset or empty); `$$` is a literal `$`. An unset variable without
a default is an error naming it. `~` is the home folder.

Nothing a run writes may be an input file: an output, errors or summary file that input.path names (itself, or
through its glob) is refused, unless it is this job's own earlier output (its summary says so), which a run
never reads back.
"""

from __future__ import annotations

import json
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fiddler_batch.demo import DEMOS
from fiddler_batch.errors import InputError, JobSpecError, Problem
from fiddler_batch.io.files import input_files, remote_problem
from fiddler_batch.spec import JobSpec, Location, compression_of, input_format, is_remote
from fiddler_batch.wording import Key, dotted, explain, unwrap_optional

COMMAND_LINE = "command line"
VARIABLE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class UnsetVariable(ValueError):
    """A path names an environment variable that is not set."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def expand_variables(text: str, environ: typing.Mapping[str, str] | None = None) -> str:
    """`text` with `$NAME`, `${NAME}` and `${NAME:-default}` replaced from the environment, `$$` by `$`; raises
    `UnsetVariable` for an unset variable without a default."""
    env = os.environ if environ is None else environ

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(3)
        found = env.get(name)
        if match.group(2) is not None:
            return found if found else match.group(2)
        if found is None:
            raise UnsetVariable(name)
        return found

    return VARIABLE.sub(value, text)


def load_job(
    path: Path, overrides: typing.Sequence[str] = (), settings: typing.Mapping[str, Any] | None = None
) -> JobSpec:
    """The validated job spec of the YAML file at `path`, with command-line changes applied on top.

    `overrides` are "KEY=VALUE" strings (VALUE parsed as YAML); `settings` map keys to typed values and are
    applied last (they come from dedicated options such as --output).
    """
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobSpecError(
            [Problem(shown, "(job file)", f"cannot read it: {exc.strerror or exc}", "check the path of the job file")]
        ) from None
    raw, lines, problems = _parse_yaml(text, shown)
    if problems:
        raise JobSpecError(problems)
    try:
        _resolve_paths(raw, path.parent)
    except _UnsetAt as exc:
        raise JobSpecError([_Locator(shown, lines, set()).problem(exc.key, *exc.words)]) from None
    from_cli: set[Key] = set()
    try:
        for assignment in overrides:
            from_cli.add(_set(raw, *_parse_assignment(assignment)))
        for name, value in (settings or {}).items():
            from_cli.add(_set(raw, name, value))
    except _UnsetAt as exc:
        raise JobSpecError([Problem(COMMAND_LINE, dotted(exc.key), *exc.words)]) from None
    locate = _Locator(shown, lines, from_cli)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise JobSpecError([_problem_from_error(error, locate) for error in exc.errors()]) from None
    problems = _check_paths(spec, locate)
    if problems:
        raise JobSpecError(problems)
    return spec


def _check_paths(spec: JobSpec, locate: _Locator) -> list[Problem]:
    """Problems with the file system: inputs that match nothing, models that are not there."""
    problems = _input_problems(spec, locate)
    model = spec.model.path
    if model.startswith("demo:"):
        if model[len("demo:") :] not in DEMOS:
            problems.append(
                locate.problem(
                    ("model", "path"),
                    f"unknown demo model {model!r}",
                    f"use one of: {', '.join('demo:' + name for name in DEMOS)}",
                )
            )
    elif Path(model).is_absolute():
        if not Path(model).is_dir():
            problems.append(
                locate.problem(
                    ("model", "path"),
                    f"no checkpoint folder at {model!r}",
                    "give an existing Hugging Face checkpoint folder, a hub id, or demo:tiny-mixtral",
                )
            )
        elif not (Path(model) / "config.json").is_file():
            problems.append(
                locate.problem(
                    ("model", "path"),
                    f"{model!r} has no config.json",
                    "give the folder that holds the checkpoint's config.json",
                )
            )
    if spec.output.path.is_dir():
        problems.append(
            locate.problem(
                ("output", "path"), f"{str(spec.output.path)!r} is a folder", "give a file name, e.g. out/results.jsonl"
            )
        )
    return problems


def _input_problems(spec: JobSpec, locate: _Locator) -> list[Problem]:
    """Problems with the input files: none there, a remote protocol that cannot be read here, unknown formats,
    files the job would write over."""
    where = ("input", "path")
    if is_remote(spec.input.path):
        missing = remote_problem(str(spec.input.path))
        if missing:
            return [locate.problem(where, *missing)]
    try:
        every = input_files(spec.input.path, spec.input.glob_order)
    except InputError as exc:
        return [locate.problem(where, problem.message, problem.fix) for problem in exc.problems]
    overwritten = _overwritten_inputs(spec, every, locate)
    if overwritten:
        return overwritten
    files = input_files(spec.input.path, spec.input.glob_order, spec.input.excluded)
    if not files:
        besides = " (besides this job's own output files)" if every else ""
        return [
            locate.problem(
                where,
                f"no file matches {str(spec.input.path)!r}{besides}",
                "check the path; relative paths in a job file are relative to the job file's folder",
            )
        ]
    for file in files:
        kind = input_format(file, spec.input.format)
        if kind is None:
            return [
                locate.problem(
                    where,
                    f"cannot tell the format of {str(file)!r} from its extension",
                    "use .jsonl, .jsonl.gz, .jsonl.zst or .parquet files, or set input.format",
                )
            ]
        if kind == "parquet" and compression_of(file, spec.input.compression) is not None:
            return [
                locate.problem(
                    where,
                    f"{str(file)!r} is a compressed Parquet file",
                    "Parquet compresses inside the file: give the .parquet file itself, or set input.compression: none",
                )
            ]
    return []


def _overwritten_inputs(spec: JobSpec, files: list[Location], locate: _Locator) -> list[Problem]:
    """Input files that a run would write over: an output, errors or summary path that input.path names, unless
    it is this job's own earlier output (which is never read)."""
    if is_remote(spec.input.path):
        return []
    ours = _own_earlier_files(spec)
    matched = {os.path.abspath(file) for file in files}
    problems = []
    for key, path in ((("output", "path"), spec.output.path), (("errors", "path"), spec.errors_path)):
        if os.path.abspath(path) in matched and os.path.abspath(path) not in ours:
            problems.append(
                locate.problem(
                    key if key != ("errors", "path") or spec.errors.path is not None else ("output", "path"),
                    f"{str(path)!r} is an input file (input.path {str(spec.input.path)!r} names it): the run would "
                    "write over it",
                    "write the results and errors elsewhere, or narrow input.path so that it names the inputs only",
                )
            )
    return problems


def _own_earlier_files(spec: JobSpec) -> set[str]:
    """The output and errors files an earlier run of this job wrote, as its summary names them."""
    try:
        summary = json.loads(spec.summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(summary, dict):
        return set()
    return {os.path.abspath(str(summary[key])) for key in ("output", "errors") if isinstance(summary.get(key), str)}


class _UnsetAt(Exception):
    """An unset environment variable in the path at `key`."""

    def __init__(self, key: Key, name: str):
        super().__init__(name)
        self.key = key
        self.words = (
            f"environment variable {name} is not set",
            f"set it, give a default as ${{{name}:-default}}, or write $$ for a literal $",
        )


class _Locator:
    """Turns a key into a Problem located at its YAML line, or on the command line if it was set there."""

    def __init__(self, file: str, lines: dict[Key, int], from_cli: set[Key]):
        self.file, self.lines, self.from_cli = file, lines, from_cli

    def problem(self, key: Key, message: str, fix: str) -> Problem:
        for end in range(len(key), 0, -1):
            if key[:end] in self.from_cli:
                return Problem(COMMAND_LINE, dotted(key), message, fix)
        for end in range(len(key), 0, -1):
            if key[:end] in self.lines:
                return Problem(self.file, dotted(key), message, fix, line=self.lines[key[:end]])
        return Problem(self.file, dotted(key), message, fix)


def _parse_yaml(text: str, shown: str) -> tuple[dict[str, Any], dict[Key, int], list[Problem]]:
    """The YAML document as a dict, the line of every key, and syntax problems (duplicate keys included)."""
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        message = " ".join(str(getattr(exc, "problem", None) or exc).split())
        return (
            {},
            {},
            [
                Problem(
                    shown,
                    "(syntax)",
                    f"invalid YAML: {message}",
                    "fix the syntax at that line: indentation, a missing ':' or an unclosed quote",
                    line=mark.line + 1 if mark else None,
                )
            ],
        )
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return (
            {},
            {},
            [
                Problem(
                    shown,
                    "(top level)",
                    "the job file is not a mapping of sections",
                    "write sections as `model:`, `input:`, `output:`, ... at the top level",
                    line=1,
                )
            ],
        )
    lines: dict[Key, int] = {}
    problems: list[Problem] = []
    _walk_nodes(root, (), lines, problems, shown)
    return raw, lines, problems


def _walk_nodes(node: yaml.Node | None, key: Key, lines: dict[Key, int], problems: list[Problem], shown: str) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*key, str(key_node.value))
            if child in lines:
                problems.append(
                    Problem(
                        shown,
                        dotted(child),
                        "key given twice",
                        f"keep one of the two (the other is at line {lines[child]})",
                        line=key_node.start_mark.line + 1,
                    )
                )
            lines[child] = key_node.start_mark.line + 1
            _walk_nodes(value_node, child, lines, problems, shown)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*key, i)] = item.start_mark.line + 1
            _walk_nodes(item, (*key, i), lines, problems, shown)


def _parse_assignment(assignment: str) -> tuple[str, Any]:
    """KEY=VALUE as (KEY, VALUE parsed as YAML, or the raw text if it is not valid YAML)."""
    name, sep, text = assignment.partition("=")
    if not sep or not name.strip():
        raise JobSpecError(
            [Problem(COMMAND_LINE, assignment, "expected KEY=VALUE", "write e.g. --set generation.temperature=0.7")]
        )
    try:
        return name.strip(), yaml.safe_load(text)
    except yaml.YAMLError:
        return name.strip(), text


def _set(raw: dict[str, Any], name: str, value: Any) -> Key:
    """Set the dotted key `name` in `raw`; a path given on the command line resolves against the current folder."""
    parts = name.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = str(value) if isinstance(value, Path) else value
    key = tuple(parts)
    if key in _path_keys() or key == ("model", "path"):
        _resolve_one(raw, key, Path.cwd())
    return key


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for key in (*_path_keys(), ("model", "path")):
        _resolve_one(raw, key, base)


def _resolve_one(raw: dict[str, Any], key: Key, base: Path) -> None:
    node: Any = raw
    for part in key[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not isinstance(node.get(key[-1]), str):
        return
    try:
        value = node[key[-1]] = expand_variables(node[key[-1]])
    except UnsetVariable as exc:
        raise _UnsetAt(key, exc.name) from None
    if is_remote(value):
        return  # a URL: read through fsspec as written
    if key == ("model", "path"):
        if value.startswith("demo:"):
            return
        local = not Path(os.path.expanduser(value)).is_absolute() and (base / value).exists()
        if not (local or value.startswith((".", "/", "~"))):
            return  # a hub id
    node[key[-1]] = os.path.abspath(base / os.path.expanduser(value))


def _path_keys() -> list[Key]:
    """Keys of the job spec typed as paths (found from the model, so engine settings are covered too)."""
    keys: list[Key] = []

    def walk(model: type[BaseModel], prefix: Key) -> None:
        for name, field in model.model_fields.items():
            inner = unwrap_optional(field.annotation)
            if inner is Path or inner == Location:
                keys.append((*prefix, name))
            elif isinstance(inner, type) and issubclass(inner, BaseModel):
                walk(inner, (*prefix, name))

    walk(JobSpec, ())
    return keys


def _problem_from_error(error: Any, locate: _Locator) -> Problem:
    key: Key = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    if "key" in ctx:
        key = (*key, *ctx["key"].split("."))
    message, fix = explain(error, key)
    return locate.problem(key, message, fix)
