"""data.source=hf: a local dataset directory (no hub here; a hub id goes through the same load_dataset call) with
its own split and column names trains the tiny pipeline; bad data fails before any privacy is spent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main
from trainers.data.config import DataConfig
from trainers.data.io import (
    DataError,
    load_eval_prompts,
    load_preferences,
    load_prompts,
    load_public,
    load_sft,
)
from trainers.data.task import build_task

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "launch" / "configs" / "tiny.yaml")
RENAME = {"user_id": "author", "prompt": "question", "response": "answer", "chosen": "good", "rejected": "bad",
          "text": "body"}
SPLITS = {"sft": "train_sft", "rm": "train_prefs", "ppo": "train_prompts", "eval": "test_prompts",
          "public_train": "corpus", "public_valid": "corpus_valid"}
MAPPING = [f"data.columns.{role}={col}" for role, col in RENAME.items()]
SPLIT_ARGS = [f"data.splits.{role}={split}" for role, split in SPLITS.items()]
FAST = [
    "sft.steps=2", "rm.steps=2", "rm.gold_pairs=8", "ppo.iterations=2", "ppo.rollout_actors=0",
    "ppo.max_new_tokens=6", "eval.prompts=4", "eval.max_new_tokens=6", "eval.perplexity_records=4",
]


@pytest.fixture(scope="module")
def hf_rows(tmp_path_factory):
    """The tiny embedded task's rows, with HF-style column names (what a user's own dataset looks like)."""
    from launch.config import load_config
    from launch.schema import RunConfig

    cfg = load_config(RunConfig, TINY)
    task = build_task(cfg.data, cache_dir=tmp_path_factory.mktemp("embedded"), progress=False)
    tables = {"sft": load_sft(task.sft), "rm": load_preferences(task.rm), "ppo": load_prompts(task.ppo),
              "eval": load_eval_prompts(task.eval), "public_train": load_public(task.public_train),
              "public_valid": load_public(task.public_valid)}
    return {role: [{RENAME.get(k, k): v for k, v in row.items()} for row in t.rows.to_list()]
            for role, t in tables.items()}


def _save(path: Path, rows: dict[str, list[dict]]) -> Path:
    import datasets

    datasets.DatasetDict({SPLITS[role]: datasets.Dataset.from_list(r) for role, r in rows.items()}).save_to_disk(
        str(path))
    return path


@pytest.mark.slow  # ~50 s on 2 cores: a whole tiny pipeline; the fast tests below cover loading and validation
def test_local_dataset_directory_with_column_mapping_trains_the_tiny_pipeline(tmp_path, hf_rows, capsys):
    ds_dir = _save(tmp_path / "my_dataset", hf_rows)
    run_dir = tmp_path / "run"
    code = main(["run", "--config", TINY, f"run.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}",
                 "data.source=hf", f"data.hf_dataset={ds_dir}", *SPLIT_ARGS, *MAPPING, *FAST, "--no-progress",
                 "--json"])
    assert code == 0, capsys.readouterr().err[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "completed" and report["task"]["source"] == "hf"
    # the users are the dataset's authors, per stage, nothing synthetic
    assert report["task"]["users"] == {role: len({r["author"] for r in hf_rows[role]}) for role in ("sft", "rm", "ppo")}
    assert report["task"]["per_record_users"] == []
    for name, entry in report["stages"].items():
        assert 0 < entry["privacy"]["epsilon_spent"] <= entry["privacy"]["target_epsilon"], name
    assert main(["privacy", "verify", str(run_dir)]) == 0


def test_same_rows_as_files_after_mapping(tmp_path, hf_rows):
    ds_dir = _save(tmp_path / "d", hf_rows)
    cfg = DataConfig(source="hf", hf_dataset=str(ds_dir))
    for role, split in SPLITS.items():
        setattr(cfg.splits, role, split)
    for role, col in RENAME.items():
        setattr(cfg.columns, role, col)
    cfg.check()
    task = build_task(cfg, cache_dir=tmp_path / "cache", progress=False)
    sft = load_sft(task.sft)
    assert sft.rows["user_id"] == [r["author"] for r in hf_rows["sft"]]
    assert sft.rows["response"] == [r["answer"] for r in hf_rows["sft"]]
    assert load_preferences(task.rm).rows["chosen"] == [r["good"] for r in hf_rows["rm"]]
    again = build_task(cfg, cache_dir=tmp_path / "cache", progress=False)  # reused: same fingerprints, same files
    assert again.sft == task.sft
    assert task.counts["public_train"] == len(hf_rows["public_train"])


def test_a_split_of_public_domain_text_becomes_the_validation_text(tmp_path, hf_rows):
    """data.splits.domain_valid: public text of the users' domain, what the stages validate on (else public_valid)."""
    import datasets

    ds_dir = _save(tmp_path / "d", hf_rows)
    dsd = datasets.load_from_disk(str(ds_dir))
    notes = [{"body": f"public note {i}: the patient was seen on the ward"} for i in range(5)]
    dsd["published_notes"] = datasets.Dataset.from_list(notes)
    dsd.save_to_disk(str(tmp_path / "d2"))
    cfg = DataConfig(source="hf", hf_dataset=str(tmp_path / "d2"))
    for role, split in {**SPLITS, "domain_valid": "published_notes"}.items():
        setattr(cfg.splits, role, split)
    for role, col in RENAME.items():
        setattr(cfg.columns, role, col)
    cfg.check()
    task = build_task(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert task.validation_text == task.domain_valid != task.public_valid
    assert load_public(task.validation_text).rows["text"] == [r["body"] for r in notes]
    assert task.counts["domain_valid"] == 5
    cfg.splits.domain_valid = ""
    plain = build_task(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert plain.domain_valid == "" and plain.validation_text == plain.public_valid


def test_dpalign_data_validates_and_summarizes_a_dataset(tmp_path, hf_rows, capsys):
    ds_dir = _save(tmp_path / "d", hf_rows)
    assert main(["data", "--config", TINY, f"run.cache_dir={tmp_path / 'cache'}", "data.source=hf",
                 f"data.hf_dataset={ds_dir}", *SPLIT_ARGS, *MAPPING]) == 0
    out = capsys.readouterr().out
    assert f"Hugging Face dataset {ds_dir}, validated" in out
    assert f"D1 sft       {len(hf_rows['sft']):,} records from {len({r['author'] for r in hf_rows['sft']}):,} users" in out


@pytest.mark.parametrize("breakage, fragments", [
    (lambda rows: [{k: v for k, v in r.items() if k != "answer"} for r in rows],
     ["split 'train_sft'", "missing column 'answer'", "data.columns.response=answer", "question"]),
    (lambda rows: rows[:2] + [{**rows[2], "answer": "   "}] + rows[3:],
     ["split 'train_sft'", "row 3", "'response' is '   '", "non-empty string", "mapped by data.columns"]),
    (lambda rows: rows[:4] + [{**rows[4], "author": ""}] + rows[5:],
     ["split 'train_sft'", "row 5", "user_id is ''", "non-empty string"]),
])
def test_bad_data_fails_before_any_privacy_is_spent(tmp_path, hf_rows, capsys, breakage, fragments):
    rows = {**hf_rows, "sft": breakage([dict(r) for r in hf_rows["sft"]])}
    ds_dir = _save(tmp_path / "bad", rows)
    run_dir = tmp_path / "run"
    code = main(["run", "--config", TINY, f"run.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}",
                 "data.source=hf", f"data.hf_dataset={ds_dir}", *SPLIT_ARGS, *MAPPING, *FAST, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not run_dir.exists()  # no run directory, no ledger: nothing spent


def test_missing_split_and_mapped_user_column_are_named(tmp_path, hf_rows):
    ds_dir = _save(tmp_path / "d", hf_rows)
    cfg = DataConfig(source="hf", hf_dataset=str(ds_dir))
    with pytest.raises(DataError, match=r"split 'sft': no such split \(data.splits.sft\); the dataset has splits"):
        build_task(cfg, cache_dir=tmp_path / "c", progress=False)
    for role, split in SPLITS.items():
        setattr(cfg.splits, role, split)
    for role, col in RENAME.items():
        setattr(cfg.columns, role, col)
    cfg.columns.user_id = "writer"
    with pytest.raises(DataError, match=r"missing column 'writer' for the role 'user_id' \(data.columns.user_id="):
        build_task(cfg, cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "data").exists() or not any((tmp_path / "c" / "data").glob("hf-*"))


def test_config_requires_the_dataset_and_paired_public_splits(capsys):
    assert _config_error("data.source=hf") and "data.hf_dataset" in capsys.readouterr().err
    assert _config_error("data.source=hf", "data.hf_dataset=x", "data.splits.public_train=a")
    assert "data.splits.public_valid" in capsys.readouterr().err
    assert _config_error("data.source=hf", "data.hf_dataset=x", "data.columns.author=user")  # unknown role
    assert "data.columns.author" in capsys.readouterr().err


def _config_error(*overrides: str) -> bool:
    with pytest.raises(SystemExit) as info:
        main(["data", "--config", TINY, *overrides])
    return info.value.code == 2


def test_a_directory_of_data_files_goes_through_load_dataset(tmp_path, hf_rows):
    """A hub id and a local directory of data files take the same ``datasets.load_dataset`` call."""
    from trainers.data.hf import open_dataset
    from trainers.data.io import write_jsonl

    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", hf_rows["sft"])
    write_jsonl(tmp_path / "files" / "test.jsonl", hf_rows["eval"])
    dsd = open_dataset(DataConfig(source="hf", hf_dataset=str(tmp_path / "files")))
    assert set(dsd) == {"train", "test"} and len(dsd["train"]) == len(hf_rows["sft"])
    with pytest.raises(DataError, match="could not be opened"):
        open_dataset(DataConfig(source="hf", hf_dataset=str(tmp_path / "nothing-here")))
