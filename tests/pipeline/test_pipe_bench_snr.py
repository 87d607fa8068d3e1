"""benchmarks/update_snr.py: the per-group signal and noise of a private run, read at the engine's clipping."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from accounting.ledger import read_ledger

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("update_snr", ROOT / "benchmarks" / "update_snr.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def _main(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["update_snr.py", *argv])
    return bench.main()


@pytest.mark.heavy(9)
def test_noise_is_the_ledgers_sigma_and_signal_never_exceeds_the_thresholds(tmp_path, tiny_cache, monkeypatch):
    run_dir, out = tmp_path / "run", tmp_path / "snr.json"
    assert _main(monkeypatch, "--config", str(ROOT / "launch" / "configs" / "tiny.yaml"), "--json-out", str(out),
                 "--run-dir", str(run_dir), "--steps", f"run.cache_dir={tiny_cache}", "sft.steps=2", "rm.steps=2",
                 "ppo.iterations=2") == 0
    blob = json.loads(out.read_text())
    events = read_ledger(run_dir / "ledger.jsonl").events
    batch = {"sft": 6, "rm": 6, "ppo": 4}  # launch/configs/tiny.yaml's expected users per step
    assert set(blob["stages"]) == set(batch)
    for row in blob["releases"]:
        # one release per step here (ppo_epochs 1): the stage's n-th release is its n-th ledger event
        sigma = [e.noise_multiplier for e in events if e.stage == row["stage"]][row["release"]]
        b = batch[row["stage"]]
        thresholds = [g["threshold"] for g in row["groups"]]
        assert math.sqrt(sum(c * c for c in thresholds)) == pytest.approx(1.0)  # engine.clip_norm, split per module
        for g in row["groups"]:
            # the noise the engine adds: sigma_eff times the norm of the threshold vector, on every coordinate
            assert g["noise"] == pytest.approx(sigma * 1.0 * math.sqrt(g["numel"]) / b, rel=1e-6)
            assert 0.0 <= g["clipped"] <= 1.0 and g["norm_median"] <= g["norm_p90"]
            # each sampled user's clipped group gradient has norm <= C_k (the triangle inequality bounds the sum)
            assert g["signal"] <= row["users"] * g["threshold"] / b * (1 + 1e-6)
            assert g["snr"] == pytest.approx(g["signal"] / g["noise"])
    assert blob["stages"]["ppo"][-1]["group"] == "head"  # the value head is its own clip group


def test_refuses_a_preset_without_noise(monkeypatch, capsys):
    with pytest.raises(SystemExit) as err:
        _main(monkeypatch, "--config", str(ROOT / "launch" / "configs" / "tiny.yaml"), "privacy.preset=nonprivate")
    assert err.value.code == 2 and "no signal-to-noise" in capsys.readouterr().err
