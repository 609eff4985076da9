"""The exported schemas and the README's tables match the code."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from fiddler_batch.cli import main
from fiddler_batch.io.records import OutputRecord
from fiddler_batch.schemas import readme_with_tables, schema_files
from fiddler_batch.spec import JobSpec

from jobhelpers import REPO


def test_committed_schema_files_match_the_models() -> None:
    for name, text in schema_files().items():
        assert (REPO / "schemas" / name).read_text(encoding="utf-8") == text, f"run `make schemas` ({name})"


def test_schemas_describe_the_models() -> None:
    job = json.loads((REPO / "schemas" / "job.schema.json").read_text())
    record = json.loads((REPO / "schemas" / "record.schema.json").read_text())
    assert set(job["properties"]) == set(JobSpec.model_fields) and job["additionalProperties"] is False
    assert set(record["properties"]) == set(OutputRecord.model_fields)
    generation = job["$defs"]["GenerationSpec"]["properties"]
    assert generation["temperature"]["description"].startswith("Sampling temperature.")


def test_readme_tables_match_the_models() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme_with_tables(readme) == readme, "run `make schemas`"
    assert "| `batching.prefill_heavy_ratio` |" in readme and "| `timing.time_to_first_token_s` |" in readme


def test_schema_command_writes_and_checks(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "schemas"
    result = runner.invoke(main, ["schema", "--out", str(out), "--readme", str(tmp_path / "none.md")])
    assert result.exit_code == 0
    assert {p.name: p.read_text() for p in out.iterdir()} == schema_files()
    assert runner.invoke(main, ["schema", "--out", str(out), "--check"]).exit_code == 0
    (out / "job.schema.json").write_text("{}")
    result = runner.invoke(main, ["schema", "--out", str(out), "--readme", str(tmp_path / "none.md"), "--check"])
    assert result.exit_code == 1 and "out of date" in result.output


def test_schema_says_missing_not_out_of_date_and_leaves_a_readme_without_markers(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "schemas"
    readme = tmp_path / "README.md"
    readme.write_text("# A project without the tables\n")
    result = runner.invoke(main, ["schema", "--out", str(out), "--readme", str(readme), "--check"])
    assert result.exit_code == 1 and "missing:" in result.output and "out of date" not in result.output
    assert "no table markers" in result.output  # said, not a traceback
    result = runner.invoke(main, ["schema", "--out", str(out), "--readme", str(readme)])
    assert result.exit_code == 0 and result.exception is None
    assert readme.read_text() == "# A project without the tables\n" and (out / "job.schema.json").is_file()
