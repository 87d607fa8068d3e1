"""MetricsLogger: namespaced keys, private statistics refused unless released, TensorBoard events written."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from launch.pipeline.metrics import (
    MetricKeyError,
    MetricsLogger,
    PrivateMetricError,
    read_metrics,
    series,
)


@dataclass
class _Cfg:
    lr: float = 0.5


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_reach_tensorboard_and_jsonl(tmp_path):
    with MetricsLogger(tmp_path / "tb", tmp_path / "metrics.jsonl") as m:
        m.log_config(_Cfg())
        for step in range(3):
            m.log("privacy/epsilon", 0.5 * step, step=step, stage="sft", private=False)
            m.log("losses/sft", 2.0 - step, step=step, stage="sft", private=True, released=True)
        m.log_dict({"ppo/kl": 0.1, "ppo/clipfrac": 0.2}, step=0, stage="ppo", private=True, released=True)
        m.log("perf/steps_per_sec", 3.0, step=0, stage="ppo", private=False)
    assert list((tmp_path / "tb" / "sft").glob("events.out.tfevents.*"))
    sft = _scalars(tmp_path / "tb" / "sft")
    assert sft["privacy/epsilon"] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert set(_scalars(tmp_path / "tb" / "ppo")) == {"ppo/kl", "ppo/clipfrac", "perf/steps_per_sec"}
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 9
    assert series(rows, "losses/sft", stage="sft") == [(0, 2.0), (1, 1.0), (2, 0.0)]
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["type"] == "config" and first["config"] == {"lr": 0.5}
    assert list((tmp_path / "tb" / "run").glob("events.out.tfevents.*"))  # config text


def test_private_unreleased_is_refused_and_not_written(tmp_path):
    with MetricsLogger(tmp_path / "tb", tmp_path / "m.jsonl") as m:
        with pytest.raises(PrivateMetricError, match="noisy release"):
            m.log("ppo/reward", 1.0, step=0, stage="ppo", private=True)
        with pytest.raises(PrivateMetricError):
            m.log_dict({"ppo/kl": 0.1, "ppo/reward": 1.0}, step=0, stage="ppo", private=True)
        with pytest.raises(TypeError):
            m.log("ppo/kl", 1.0, step=0, stage="ppo", private="no")
    assert read_metrics(tmp_path / "m.jsonl") == []


@pytest.mark.parametrize("key", ["loss", "misc/x", "Losses/x", "privacy/"])
def test_keys_must_be_namespaced(tmp_path, key):
    with MetricsLogger(tmp_path / "tb", tmp_path / "m.jsonl") as m:
        with pytest.raises(MetricKeyError, match="namespace"):
            m.log(key, 1.0, step=0, stage="sft", private=False)


def test_non_finite_refused_and_torn_tail_ignored(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(tmp_path / "tb", path) as m:
        with pytest.raises(ValueError, match="not finite"):
            m.log("losses/sft", float("nan"), step=0, stage="sft", private=False)
        m.log("losses/sft", 1.0, step=0, stage="sft", private=False)
    with open(path, "a") as fh:
        fh.write('{"key": "losses/sft", "val')  # crash mid-write
    assert len(read_metrics(path)) == 1
    with MetricsLogger(tmp_path / "tb", path) as m:  # resume: the torn line is cut, rows append cleanly
        m.log("losses/sft", 0.5, step=1, stage="sft", private=False)
    assert series(read_metrics(path), "losses/sft") == [(0, 1.0), (1, 0.5)]


def test_private_stage_rows_carry_no_clock_time_in_jsonl_or_tensorboard(tmp_path):
    """A private stage's step times follow its private batch sizes: its rows have no time in metrics.jsonl, the
    logger's start time in TensorBoard, and its event file is opened with the logger (its name dates no step)."""
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path / "tb", tmp_path / "m.jsonl", withheld_time_stages={"sft"}) as m:
        started = m.started
        files_at_start = sorted(p.name for p in (tmp_path / "tb" / "sft").glob("events.out.tfevents.*"))
        time.sleep(1.1)  # so that a clock time would differ from the start by more than a second
        for step in range(3):
            m.log("privacy/epsilon", 0.1 * step, step=step, stage="sft", private=False)
            m.log("eval/gold_reward", 0.2, step=step, stage="eval", private=False)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert {r["time"] for r in rows if r["stage"] == "sft"} == {None}
    assert all(r["time"] > started + 1 for r in rows if r["stage"] == "eval")  # public stages keep their times
    assert files_at_start and sorted(p.name for p in (tmp_path / "tb" / "sft").glob("events.out.tfevents.*")) \
        == files_at_start
    acc = EventAccumulator(str(tmp_path / "tb" / "sft"))
    acc.Reload()
    assert all(e.wall_time == pytest.approx(started) for e in acc.Scalars("privacy/epsilon"))
    acc = EventAccumulator(str(tmp_path / "tb" / "eval"))
    acc.Reload()
    assert all(e.wall_time > started + 1 for e in acc.Scalars("eval/gold_reward"))
