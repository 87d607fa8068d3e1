"""run.loggers: TensorBoard, W&B (offline) and MLflow (file store) receive exactly the rows of metrics.jsonl -- the
public ones that passed the one privacy filter -- and nothing else."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

from launch.pipeline.loggers import make_sinks
from launch.pipeline.metrics import MetricsLogger, PrivateMetricError, read_metrics

# Found, not imported: importing mlflow and wandb costs ~5 s, paid by each test worker at collection otherwise.
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("wandb", "mlflow")),
    reason="the loggers extra (pip install 'dpalign[loggers]') is not installed")

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "launch" / "configs" / "tiny.yaml")


def tensorboard_rows(tb_dir: Path) -> dict[tuple[str, str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = {}
    for stage_dir in sorted(p for p in tb_dir.iterdir() if p.is_dir()):
        acc = EventAccumulator(str(stage_dir))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                rows[(stage_dir.name, tag, int(event.step))] = float(event.value)
    return rows


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B offline run file (LevelDB log format: 32 KiB blocks, 7-byte record headers)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, block, records, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        else:
            records.append(partial + chunk)
    return records


def wandb_rows(run_dir: Path) -> dict[tuple[str, str, int], float]:
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = {}
    for raw in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        assert kind not in ("stats", "output", "output_raw"), kind  # no system metrics, no console capture
        if kind != "history":
            continue
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
        user = {k: v for k, v in items.items() if not k.startswith("_")}
        steps = [k for k in user if k.endswith("/step") and k.count("/") == 1]
        assert len(steps) == 1, user  # one stage per logged row, with its own step axis
        stage = steps[0].split("/")[0]
        step = user.pop(steps[0])
        for key, value in user.items():
            assert key.startswith(stage + "/"), key
            rows[(stage, key[len(stage) + 1:], int(step))] = float(value)
    return rows


def mlflow_rows(run_dir: Path) -> dict[tuple[str, str, int], float]:
    import os

    from mlflow.tracking import MlflowClient

    assert os.environ.get("MLFLOW_ALLOW_FILE_STORE") == "true"  # set by the sink for its default file store

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "dpalign"]
    (run,) = client.search_runs([exp.experiment_id])
    rows = {}
    for name in run.data.metrics:
        stage, key = name.split("/", 1)
        for m in client.get_metric_history(run.info.run_id, name):
            rows[(stage, key, int(m.step))] = float(m.value)
    return rows


def jsonl_rows(path: Path) -> dict[tuple[str, str, int], float]:
    return {(r["stage"], r["key"], int(r["step"])): float(r["value"]) for r in read_metrics(path)}


def assert_same(expected: dict, got: dict, what: str, *, rel: float = 0.0) -> None:
    assert set(got) == set(expected), (what, sorted(set(got) ^ set(expected))[:5])
    for k, v in expected.items():
        assert math.isclose(got[k], v, rel_tol=rel, abs_tol=1e-6 if rel else 0.0), (what, k, got[k], v)


def test_every_backend_gets_exactly_what_the_filter_let_through(tmp_path):
    run_dir = tmp_path / "run"
    sinks = make_sinks(["tensorboard", "wandb", "mlflow"], tb_dir=run_dir / "tb", run_dir=run_dir, run_id="r1")
    # sft is private: its times are withheld (W&B gets its rows at close, MLflow the logger's start time)
    logger = MetricsLogger(run_dir / "tb", run_dir / "metrics.jsonl", sinks=sinks, withheld_time_stages={"sft"})
    logger.log_config({"run": {"seed": 0}, "privacy": {"target_epsilon": 4.0}})
    for step in range(1, 4):
        logger.log("privacy/epsilon", 0.5 * step, step=step, stage="sft", private=False)
        logger.log("privacy/noisy_grad_norm", 1.25 + step, step=step, stage="sft", private=True, released=True)
    logger.log("eval/rm_accuracy", 0.625, step=2, stage="rm", private=False)
    logger.log("ppo/kl", 0.031, step=1, stage="ppo", private=False)
    with pytest.raises(PrivateMetricError):  # a raw private statistic reaches no backend
        logger.log("losses/sft", 2.5, step=3, stage="sft", private=True)
    logger.close()

    expected = jsonl_rows(run_dir / "metrics.jsonl")
    assert len(expected) == 8 and ("sft", "losses/sft", 3) not in expected
    assert_same(expected, tensorboard_rows(run_dir / "tb"), "tensorboard", rel=1e-6)  # float32 in event files
    assert_same(expected, wandb_rows(run_dir), "wandb")
    assert_same(expected, mlflow_rows(run_dir), "mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name == "dpalign"])
    stamps = {m.timestamp for m in client.get_metric_history(run.info.run_id, "sft/privacy/epsilon")}
    assert stamps == {int(logger.started * 1000)}


def test_config_refuses_unknown_or_repeated_loggers(capsys):
    from launch.cli import main

    for bad, fragment in (("[tensorboard,neptune]", "unknown logger 'neptune'"), ("[wandb,wandb]", "twice")):
        with pytest.raises(SystemExit) as info:
            main(["data", "--config", TINY, f"run.loggers={bad}"])
        assert info.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.slow  # a tiny pipeline (~40 s on 2 cores)
def test_a_run_logs_the_same_public_metrics_to_every_backend(tmp_path):
    from launch.cli import main

    run_dir = tmp_path / "run"
    code = main(["run", "--config", TINY, f"run.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}",
                 "run.loggers=[tensorboard,wandb,mlflow]", "sft.steps=2", "rm.steps=2", "rm.gold_pairs=8",
                 "ppo.iterations=2", "ppo.rollout_actors=0", "ppo.max_new_tokens=6", "eval.prompts=4",
                 "eval.max_new_tokens=6", "eval.perplexity_records=4", "--no-progress"])
    assert code == 0
    expected = jsonl_rows(run_dir / "metrics.jsonl")
    assert {s for s, _, _ in expected} >= {"sft", "rm", "ppo"}
    # training losses of private stages never reach a log; the SFT loss on public held-out text does
    assert {k for _, k, _ in expected if k.startswith("losses/")} == {"losses/public_valid"}
    assert_same(expected, tensorboard_rows(run_dir / "tb"), "tensorboard", rel=1e-6)
    assert_same(expected, wandb_rows(run_dir), "wandb")
    assert_same(expected, mlflow_rows(run_dir), "mlflow")
