"""Loading stage files through `datasets`: every bad-data case fails before training, naming file, row and fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main as cli_main
from trainers.data.config import DataConfig
from trainers.data.io import (
    DataError,
    load_eval_prompts,
    load_preferences,
    load_prompts,
    load_public,
    load_sft,
    user_ids,
    write_jsonl,
)
from trainers.data.task import build_task

REPO = Path(__file__).resolve().parents[2]
GOOD = {"user_id": "u1", "prompt": "The film", "response": " was great."}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    write_jsonl(path, rows)
    return path


def test_good_jsonl_and_parquet_load_the_same(tmp_path: Path):
    import datasets

    rows = [GOOD, {**GOOD, "user_id": "u2"}, {**GOOD, "prompt": "Another"}]
    js = load_sft(_jsonl(tmp_path / "d1.jsonl", rows))
    pq = tmp_path / "d1.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    pqd = load_sft(pq)
    assert len(js) == len(pqd) == 3 and js.num_users == pqd.num_users == 2
    assert user_ids(js) == user_ids(pqd) == {"u1", "u2"} and not js.per_record_users
    assert js.rows["response"] == pqd.rows["response"]


@pytest.mark.parametrize(
    "rows, loader, fragments",
    [
        (
            [GOOD, {"user_id": "u2", "prompt": "x"}],
            load_sft,
            ["row 2", "missing column 'response'", "user_id, prompt, response"],
        ),
        ([GOOD, {**GOOD, "response": "  "}], load_sft, ["row 2", "'response' is '  '", "non-empty string"]),
        ([GOOD, {**GOOD, "user_id": None}], load_sft, ["row 2", "user_id is None", "quote numeric ids"]),
        ([GOOD, {**GOOD, "user_id": 17}], load_sft, ["row 2", "user_id is 17 (int)", "non-empty string"]),
        (
            [GOOD, {"prompt": "a", "response": " b"}],
            load_sft,
            ["row 2", "missing user_id", "drop the column"],
        ),
        ([{"user_id": "u", "prompt": "p", "chosen": " a"}], load_preferences, ["row 1", "'rejected'"]),
        ([{"user_id": "u", "prompt": ""}], load_prompts, ["row 1", "'prompt' is ''"]),
        ([{"text": None}], load_public, ["row 1", "'text' is None"]),
        ([], load_eval_prompts, ["no rows"]),
    ],
)
def test_bad_rows_name_file_row_and_fix(tmp_path: Path, rows, loader, fragments):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        loader(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file_bad_json_and_wrong_type(tmp_path: Path):
    with pytest.raises(
        DataError, match=r"nope\.jsonl: file not found.*user_id, prompt, response.*data\.sft_path"
    ):
        load_sft(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2 \(line 2\): not valid JSON"):
        load_sft(bad)
    csv = tmp_path / "d1.csv"
    csv.write_text("user_id,prompt,response\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        load_sft(csv)


def test_parquet_errors_name_the_row(tmp_path: Path):
    import datasets

    path = tmp_path / "d1.parquet"
    datasets.Dataset.from_list([GOOD, {**GOOD, "user_id": None}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"d1\.parquet: row 2: user_id is None"):
        load_sft(path)
    datasets.Dataset.from_list([{"user_id": "u", "prompt": "p"}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"missing column 'response'"):
        load_sft(path)


def test_no_user_id_column_makes_each_row_its_own_user(tmp_path: Path):
    path = _jsonl(tmp_path / "d3.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    data = load_prompts(path)
    assert data.per_record_users and data.num_users == 3 and len(user_ids(data)) == 3


def test_source_files_validates_every_file_and_reports_overlap(tmp_path: Path):
    d1 = _jsonl(tmp_path / "d1.jsonl", [GOOD, {**GOOD, "user_id": "u2"}])
    d2 = _jsonl(tmp_path / "d2.jsonl", [{"user_id": "u2", "prompt": "p", "chosen": " a", "rejected": " b"}])
    d3 = _jsonl(tmp_path / "d3.jsonl", [{"prompt": "p"}])
    ev = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "q"}])
    cfg = DataConfig(source="files", sft_path=str(d1), rm_path=str(d2), ppo_path=str(d3), eval_path=str(ev))
    task = build_task(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert task.counts == {"sft": 2, "rm": 1, "ppo": 1, "eval": 1}
    assert task.users == {"sft": 2, "rm": 1, "ppo": 1, "shared": 1} and task.per_record_users == ("ppo",)
    assert not (tmp_path / "cache").exists()
    _jsonl(d2, [{"user_id": "u2", "prompt": "p", "chosen": " a"}])
    with pytest.raises(DataError, match=r"d2\.jsonl: row 1: missing column 'rejected'"):
        build_task(cfg, cache_dir=tmp_path / "cache", progress=False)


def test_source_files_takes_public_text_of_the_users_domain_for_validation(tmp_path: Path):
    d1 = _jsonl(tmp_path / "d1.jsonl", [GOOD])
    d2 = _jsonl(tmp_path / "d2.jsonl", [{"user_id": "u2", "prompt": "p", "chosen": " a", "rejected": " b"}])
    d3 = _jsonl(tmp_path / "d3.jsonl", [{"prompt": "p"}])
    ev = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "q"}])
    notes = _jsonl(tmp_path / "notes.jsonl", [{"text": "published note one"}, {"text": "published note two"}])
    files = {"sft_path": str(d1), "rm_path": str(d2), "ppo_path": str(d3), "eval_path": str(ev)}
    task = build_task(DataConfig(source="files", **files, domain_valid_path=str(notes)), cache_dir=tmp_path,
                      progress=False)
    assert task.validation_text == str(notes) and task.counts["domain_valid"] == 2
    assert build_task(DataConfig(source="files", **files), cache_dir=tmp_path, progress=False).validation_text == ""
    _jsonl(notes, [{"body": "no text column"}])
    with pytest.raises(DataError, match="notes.jsonl"):  # checked with the rest, before any training
        build_task(DataConfig(source="files", **files, domain_valid_path=str(notes)), cache_dir=tmp_path,
                   progress=False)


def test_cli_data_says_what_the_stages_validate_on(tmp_path: Path, capsys):
    base = ["data", "--config", str(REPO / "launch/configs/tiny.yaml"), f"run.cache_dir={tmp_path}"]
    assert cli_main([*base, "data.private_domain=clinical"]) == 0
    assert "validation   15 public texts of the users' domain" in capsys.readouterr().out
    assert cli_main(base) == 0
    assert "validation" not in capsys.readouterr().out  # review users: the public corpus's held-out texts


def test_cli_data_on_tiny_config(tmp_path: Path, capsys):
    argv = ["data", "--config", str(REPO / "launch/configs/tiny.yaml"), f"run.cache_dir={tmp_path}", "--json"]
    assert cli_main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["built"] and first["counts"]["sft"] > 0 and first["users"]["shared"] == 0
    assert first["canaries"] == 2 and first["stats"]["public_distinct_words"] > 500
    assert cli_main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert not second["built"] and second["root"] == first["root"]
    # Human-readable output, in a subprocess (the real entry point).
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", *argv[:-1]],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "D1 sft" in out.stdout and "reused from the cache" in out.stdout and str(tmp_path) in out.stdout


def test_cli_data_reports_bad_files_with_exit_2(tmp_path: Path, capsys):
    argv = [
        "data",
        "data.source=files",
        f"data.sft_path={tmp_path / 'missing.jsonl'}",
        "data.rm_path=x.jsonl",
        "data.ppo_path=y.jsonl",
        "data.eval_path=z.jsonl",
        f"run.cache_dir={tmp_path}",
    ]
    assert cli_main(argv) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
