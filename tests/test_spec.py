"""The job spec: YAML loading, path rules, command-line overrides, and an error with a fix for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fiddler_batch.errors import JobSpecError
from fiddler_batch.jobfile import load_job
from fiddler_batch.schemas import _leaf_fields
from fiddler_batch.spec import JobSpec

from jobhelpers import REPO, write_job


def problems(path: Path, *overrides: str, **settings: object) -> list[str]:
    with pytest.raises(JobSpecError) as caught:
        load_job(path, overrides, settings)
    return [str(problem) for problem in caught.value.problems]


def job_text(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


MINIMAL = "model:\n  path: demo:tiny-mixtral\ninput:\n  path: prompts.jsonl\noutput:\n  path: out/r.jsonl\n"


def test_minimal_job_gets_defaults_and_absolute_paths(tmp_path: Path) -> None:
    spec = load_job(job_text(tmp_path, MINIMAL))
    assert spec.generation.max_new_tokens == 64 and spec.generation.temperature == 0
    assert spec.input.path == tmp_path / "prompts.jsonl"
    assert spec.output.path == tmp_path / "out" / "r.jsonl"
    assert spec.errors_path == tmp_path / "out" / "r.errors.jsonl"
    assert spec.summary_path == tmp_path / "out" / "r.summary.json"
    assert spec.work_dir == tmp_path / "out" / "r.parts"


def test_relative_paths_follow_the_job_file_not_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = job_text(tmp_path / "jobs", MINIMAL)
    monkeypatch.chdir(tmp_path)
    from_parent = load_job(Path("jobs/job.yaml"))
    monkeypatch.chdir(tmp_path / "jobs")
    from_inside = load_job(Path("job.yaml"))
    assert from_parent == from_inside
    assert from_parent.input.path == path.parent / "prompts.jsonl"


def test_command_line_beats_yaml_and_its_paths_follow_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = job_text(tmp_path / "jobs", MINIMAL + "generation:\n  temperature: 0.5\n")
    monkeypatch.chdir(tmp_path)
    spec = load_job(
        path,
        ["generation.temperature=0.9", 'generation.stop=["\\n", END]', "batching.max_batch_size=4"],
        {"output.path": Path("elsewhere/o.parquet"), "input.limit": 3},
    )
    assert spec.generation.temperature == 0.9
    assert spec.generation.stop == ["\n", "END"]
    assert spec.batching.max_batch_size == 4
    assert spec.output.path == tmp_path / "elsewhere" / "o.parquet" and spec.output_format == "parquet"
    assert spec.input.limit == 3


def test_single_stop_string_becomes_a_list(tmp_path: Path) -> None:
    spec = load_job(job_text(tmp_path, MINIMAL + "generation:\n  stop: END\n"))
    assert spec.generation.stop == ["END"]


def test_hub_ids_stay_hub_ids_and_local_folders_resolve(tmp_path: Path) -> None:
    spec = load_job(job_text(tmp_path, MINIMAL.replace("demo:tiny-mixtral", "mistralai/Mixtral-8x7B-v0.1")))
    assert spec.model.path == "mistralai/Mixtral-8x7B-v0.1"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    spec = load_job(job_text(tmp_path, MINIMAL.replace("demo:tiny-mixtral", "ckpt")))
    assert spec.model.path == str(tmp_path / "ckpt")


def test_unknown_key_names_line_and_suggests_the_right_one(tmp_path: Path) -> None:
    [problem] = problems(job_text(tmp_path, MINIMAL + "generation:\n  max_new_token: 5\n"))
    assert problem.startswith(f"{tmp_path / 'job.yaml'}:8: generation.max_new_token: unknown key 'max_new_token'")
    assert "did you mean 'max_new_tokens'?" in problem


def test_unknown_top_level_section(tmp_path: Path) -> None:
    [problem] = problems(job_text(tmp_path, MINIMAL + "sampling:\n  seed: 1\n"))
    assert ":7: sampling: unknown key 'sampling'" in problem and "keys here: model, input, output" in problem


def test_wrong_types_each_get_line_key_and_fix(tmp_path: Path) -> None:
    text = (
        MINIMAL + "generation:\n  max_new_tokens: lots\n  temperature: -1\n  stop: 5\nbatching:\n  max_batch_size: 0\n"
    )
    found = problems(job_text(tmp_path, text))
    assert len(found) == 4
    assert ":8: generation.max_new_tokens: Input should be a valid integer" in found[0]
    assert "fix: set generation.max_new_tokens to a whole number >= 1" in found[0]
    assert ":9: generation.temperature:" in found[1] and "a number >= 0" in found[1]
    assert ":10: generation.stop:" in found[2] and "a list of strings" in found[2]
    assert ":12: batching.max_batch_size:" in found[3] and "a whole number >= 1" in found[3]


def test_section_of_the_wrong_type(tmp_path: Path) -> None:
    [problem] = problems(job_text(tmp_path, MINIMAL.replace("model:\n  path: demo:tiny-mixtral", "model: demo")))
    assert ":1: model:" in problem and "fix: set model to a section with keys (required: path)" in problem


def test_missing_section(tmp_path: Path) -> None:
    [problem] = problems(job_text(tmp_path, "model:\n  path: demo:tiny-mixtral\ninput:\n  path: prompts.jsonl\n"))
    assert (
        "output: required key missing" in problem and "fix: add output: a section with keys (required: path)" in problem
    )


def test_beam_search_with_sampling_is_refused_with_the_fix(tmp_path: Path) -> None:
    [problem] = problems(job_text(tmp_path, MINIMAL + "generation:\n  temperature: 0.7\n  num_beams: 4\n"))
    assert "generation.num_beams: beam search (num_beams > 1) cannot sample (temperature > 0)" in problem
    assert "fix: set temperature: 0 for beam search, or num_beams: 1 for sampling" in problem


def test_prefetch_beyond_the_staging_slots_is_refused_with_the_fix(tmp_path: Path) -> None:
    [problem] = problems(job_text(tmp_path, MINIMAL + "engine:\n  prefetch_experts: 6\n"))
    assert "engine.prefetch_experts: prefetch_experts (6) must stay below staging_slots (4)" in problem
    assert "fix: set staging_slots: 7 or more, or prefetch_experts: 3 or less" in problem
    spec = load_job(job_text(tmp_path, MINIMAL + "engine:\n  prefetch_experts: 6\n  staging_slots: 16\n"))
    assert spec.engine.prefetch_experts == 6 and spec.engine.staging_slots == 16


def test_output_extension_must_name_a_format(tmp_path: Path) -> None:
    [problem] = problems(job_text(tmp_path, MINIMAL.replace("r.jsonl", "r.csv")))
    assert ":6: output.path: cannot tell the output format" in problem and "or set output.format" in problem
    spec = load_job(job_text(tmp_path, MINIMAL.replace("r.jsonl", "r.csv") + "  format: jsonl\n"))
    assert spec.output_format == "jsonl"


def test_input_that_matches_nothing(tmp_path: Path) -> None:
    [problem] = problems(job_text(tmp_path, MINIMAL.replace("prompts.jsonl", "data/*.parquet")))
    assert f":4: input.path: no file matches '{tmp_path / 'data' / '*.parquet'}'" in problem
    assert "relative to the job file's folder" in problem


def test_model_folder_that_does_not_exist_and_unknown_demo(tmp_path: Path) -> None:
    [problem] = problems(job_text(tmp_path, MINIMAL.replace("demo:tiny-mixtral", "./models/none")))
    assert f":2: model.path: no checkpoint folder at '{tmp_path / 'models' / 'none'}'" in problem
    [problem] = problems(job_text(tmp_path, MINIMAL.replace("tiny-mixtral", "huge")))
    assert "unknown demo model 'demo:huge'" in problem and "demo:tiny-mixtral" in problem


def test_yaml_syntax_error_and_duplicate_key(tmp_path: Path) -> None:
    [problem] = problems(job_text(tmp_path, MINIMAL + "generation:\n  stop: [unclosed\n"))
    assert ":9: (syntax): invalid YAML" in problem
    [problem] = problems(job_text(tmp_path, MINIMAL + "  path: out/again.jsonl\n"))
    assert ":7: output.path: key given twice" in problem and "line 6" in problem


def test_missing_job_file(tmp_path: Path) -> None:
    [problem] = problems(tmp_path / "nope.yaml")
    assert "nope.yaml: (job file): cannot read it" in problem


def test_command_line_mistakes_are_located_on_the_command_line(tmp_path: Path) -> None:
    path = job_text(tmp_path, MINIMAL)
    [problem] = problems(path, "generation.tempreature=1")
    assert problem.startswith("command line: generation.tempreature: unknown key") and "'temperature'" in problem
    [problem] = problems(path, "generation.temperature")
    assert "expected KEY=VALUE" in problem


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL + "  overwrite: true\nbatching:\n  window: 0\n  foo: 1\n"
    found = problems(job_text(tmp_path, text))
    assert [problem.split(": ")[1] for problem in found] == ["output.overwrite", "batching.window", "batching.foo"]


def test_shipped_job_is_valid_and_spells_out_every_key() -> None:
    spec = load_job(REPO / "jobs" / "eval.yaml")
    assert spec.model.path == "demo:tiny-mixtral" and spec.input.path == REPO / "jobs" / "prompts" / "eval.jsonl"
    assert spec.output.path == REPO / "out" / "eval.jsonl"
    raw = yaml.safe_load((REPO / "jobs" / "eval.yaml").read_text())

    def present(key: str) -> bool:
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [key for key, _ in _leaf_fields(JobSpec, "") if not key.startswith("engine.") and not present(key)]
    assert missing == []


def test_write_job_helper_makes_a_valid_job(tmp_path: Path) -> None:
    spec = load_job(write_job(tmp_path, [{"prompt": "hi"}], generation={"max_new_tokens": 3}))
    assert spec.generation.max_new_tokens == 3 and spec.engine.device == "cpu"


@pytest.mark.parametrize(
    ("generation", "message"),
    [
        ("  num_beams: 3\n  top_p: 0.9\n", "does not sample, so top_p would have no effect"),
        ("  num_beams: 3\n  n: 2\n", "returns one completion per request, not n"),
        ("  num_beams: 3\n  logprobs: true\n", "does not support logprobs"),
        ("  num_beams: 3\n  ignore_eos: true\n", "ignore_eos cannot apply per request"),
        ("  n: 4\n", "n > 1 with temperature 0 gives n identical completions"),
        ("  top_logprobs: 3\n", "top_logprobs asks for alternatives"),
        ("  min_tokens: 10\n  max_new_tokens: 5\n", "min_tokens (10) is above max_new_tokens (5)"),
    ],
)
def test_settings_that_make_no_sense_together_are_refused_with_a_fix(
    tmp_path: Path, generation: str, message: str
) -> None:
    [problem] = problems(job_text(tmp_path, MINIMAL + "generation:\n" + generation))
    assert message in problem and "fix: " in problem
