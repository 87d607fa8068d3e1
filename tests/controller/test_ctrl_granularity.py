"""Controller granularities on the real engine and ledger: bucket, module, lora_param.

Each granularity's action reaches the engine as the thresholds it names (per LoRA A / B tensor at lora_param),
the budget guard holds for every granularity against a controller proposing sigma -> 0, and spaces built for
other clipping groups are refused before any ledger event.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from accounting.verify import verify_run
from controller.artifact import MLPActor, ObsNorm, Provenance, load_artifact, save_artifact
from controller.budget import BudgetGuard
from controller.config import ControllerConfig
from controller.policy import LearnedController
from controller.reuse import ControllerReuseError, check_reuse
from controller.spaces import SpaceMismatch, SpaceSpec
from tests.controller import ctrl_helpers as H

TARGET, DELTA, Q, USERS = 1.0, 1e-5, 0.25, 24
ENGINE_GROUPING = {"bucket": "module", "module": "module", "lora_param": "per_tensor"}
REF = 0.5


def _order(steps: int) -> float:
    return BudgetGuard(target_epsilon=TARGET, delta=DELTA, sampling_rate=Q, steps=steps).rdp_order


def fixed_action_artifact(path, spec: SpaceSpec, action: np.ndarray):
    """An artifact whose actor outputs ``action`` for every observation: zero weights, mu's bias = atanh(a)."""
    actor = MLPActor(spec.obs_dim, spec.act_dim, [4])
    with torch.no_grad():
        for lin in actor.linears():
            lin.weight.zero_()
            lin.bias.zero_()
        actor.mu.bias.copy_(torch.atanh(torch.as_tensor(action, dtype=torch.float32)))
    save_artifact(path, spec=spec, actor=actor, obs_norm=ObsNorm.identity(spec.obs_dim),
                  provenance=Provenance(trainer="test"))
    return load_artifact(path)


def _controller(model, cfg: ControllerConfig, steps: int, names, **kw) -> LearnedController:
    return LearnedController(
        config=cfg, target_epsilon=TARGET, delta=DELTA, sampling_rate=Q, steps=steps,
        validation_loss=H.public_validation(model), rdp_order=_order(steps), stage="sft",
        reference_clips=(REF,) * len(names), group_names=names, **kw,
    )


def _run(model, policy, tmp_path, steps, granularity, seed=0):
    return H.run_sft(model, policy, run_dir=tmp_path, target_epsilon=TARGET, delta=DELTA, q=Q, steps=steps,
                     num_users=USERS, rdp_order=_order(steps), seed=seed, grouping=ENGINE_GROUPING[granularity])


@pytest.mark.parametrize("granularity", ["bucket", "module", "lora_param"])
def test_fixed_action_reaches_the_engine_as_the_thresholds_it_names(granularity, tmp_path):
    model = H.tiny_lora_lm(2)
    groups = H.group_specs(model, ENGINE_GROUPING[granularity])
    names = [g.name for g in groups]
    clip_range = 4.0
    cfg = ControllerConfig(mode="frozen", load="unused", granularity=granularity, buckets=2, interval=2,
                           clip_range=clip_range)
    spec = cfg.spec(names)
    if granularity == "lora_param":  # one slot per LoRA A and per LoRA B of each of the 2 adapted modules
        assert len(names) == 4 and sum("lora_A" in n for n in names) == 2 and sum("lora_B" in n for n in names) == 2
    else:
        assert len(names) == 2
    assert spec.act_dim == spec.slots + 1 and spec.obs_dim == 4 * spec.slots + 7
    clip_entries = np.linspace(-0.9, 0.8, spec.slots)
    action = np.append(clip_entries, -1.0).astype(np.float32)
    art = fixed_action_artifact(tmp_path / "art", spec, action)
    ctrl = _controller(model, cfg, 4, names, artifact=art)
    rec = H.RecordingPolicy(ctrl)
    ledger = _run(model, rec, tmp_path, 4, granularity)
    assert len(ledger.events("sft")) == 4 and ledger.epsilon("sft") <= TARGET
    # the engine clipped exactly these groups, each to REF * clip_range ** a (buckets: 2 modules sit at the
    # 2 bucket centres, so the interpolation is exact there too)
    assert all(g == tuple(names) for g in rec.released_groups)
    a = np.asarray(art.act(np.zeros(spec.obs_dim, np.float32)), dtype=np.float64)[:-1]
    expected = {n: REF * clip_range ** float(a[k]) for k, n in enumerate(names)}
    for plan in rec.plans:
        got = dict(zip(names, plan.clip_norms, strict=True))
        for n in names:
            assert math.isclose(got[n], expected[n], rel_tol=1e-5), (n, got[n], expected[n])
    assert len(set(round(c, 6) for c in rec.plans[0].clip_norms)) == len(names)  # every group its own threshold
    assert verify_run(tmp_path).ok


class SigmaToZero(LearnedController):
    """An adversarial controller: after every decision it proposes sigma ~ 0 and thresholds far outside the range."""

    def _decide(self) -> None:
        super()._decide()
        self._sigma = 1e-9
        self._clips = tuple(1e6 for _ in self._clips)


@pytest.mark.parametrize("granularity", ["bucket", "module", "lora_param"])
def test_budget_guard_holds_for_every_granularity(granularity, tmp_path):
    steps = 6
    model = H.tiny_lora_lm(2)
    names = [g.name for g in H.group_specs(model, ENGINE_GROUPING[granularity])]
    # with released clip counts: the clip-fraction features come from the accounted centred counts, whose cost is
    # folded into each step's sigma_eff (and the count noise grows with sqrt(#groups))
    cfg = ControllerConfig(granularity=granularity, interval=2, learning_starts=0, batch_size=2,
                           gradient_steps=1, hidden=[8], count_noise_std=3.0)
    ctrl = SigmaToZero(config=cfg, target_epsilon=TARGET, delta=DELTA, sampling_rate=Q, steps=steps,
                       validation_loss=H.public_validation(model), rdp_order=_order(steps), stage="sft",
                       group_names=names)
    ledger = _run(model, ctrl, tmp_path, steps, granularity)
    events = ledger.events("sft")
    assert len(events) == steps and ctrl.guard.steps_left == 0
    assert ledger.epsilon("sft") <= TARGET
    assert all(e.noise_multiplier >= 0.5 for e in events)  # never near the proposed 1e-9
    assert ctrl._obs[ctrl.spec.slots * 4 + 6] == 1.0  # has_clip_counts: the features used the released counts
    assert verify_run(tmp_path).ok


def _lora_param_artifact(tmp_path, n_layer: int):
    model = H.tiny_lora_lm(n_layer)
    names = [g.name for g in H.group_specs(model, "per_tensor")]
    spec = SpaceSpec(granularity="lora_param", group_names=tuple(names))
    return fixed_action_artifact(tmp_path / f"lp{n_layer}", spec, spec.default_action()), names


def test_mismatched_artifact_is_refused_before_any_ledger_event(tmp_path):
    from accounting.ledger import Ledger

    art, _ = _lora_param_artifact(tmp_path, 2)
    model = H.tiny_lora_lm(4)  # 8 LoRA tensors, the artifact knows 4
    names = [g.name for g in H.group_specs(model, "per_tensor")]
    ledger = Ledger.open(tmp_path / "ledger.jsonl", run_id="t", target_epsilon=TARGET, target_delta=DELTA,
                         accountant="rdp", composition="parallel", rdp_order=_order(4))
    ledger.begin_stage("sft", user_fingerprint="u", num_users=USERS)
    cfg = ControllerConfig(mode="frozen", load=str(art.path), granularity="lora_param")
    with pytest.raises(SpaceMismatch, match="controller.granularity=bucket"):
        _controller(model, cfg, 4, names)
    wrong = ControllerConfig(mode="frozen", load=str(art.path), granularity="module")
    with pytest.raises(SpaceMismatch, match="controller.granularity=lora_param"):
        _controller(model, wrong, 4, [g.name for g in H.group_specs(model, "module")])
    assert ledger.events("sft") == [] and ledger.epsilon("sft") == 0

    # the pipeline's pre-run check says the same, naming the field, for each kind of misfit
    with pytest.raises(ControllerReuseError, match="controller.load"):
        check_reuse(ControllerConfig(enabled=True, mode="frozen", load=str(tmp_path / "none"),
                                     granularity="lora_param"), stages=["sft"])
    with pytest.raises(ControllerReuseError, match="controller.granularity"):
        check_reuse(wrong.__class__(enabled=True, mode="frozen", load=str(art.path)), stages=["sft"])
    with pytest.raises(ControllerReuseError, match="16 clipping groups|4 clipping groups"):
        check_reuse(ControllerConfig(enabled=True, mode="frozen", load=str(art.path), granularity="lora_param"),
                    stages=["sft"], group_names={"sft": names})
    fits = check_reuse(ControllerConfig(enabled=True, mode="frozen", load=str(art.path), granularity="lora_param"),
                       stages=["sft"], group_names={"sft": names[:4]})
    assert fits["sft"].spec.slots == 4


def test_spec_round_trips_granularity_and_groups(tmp_path):
    art, names = _lora_param_artifact(tmp_path, 2)
    assert art.spec.granularity == "lora_param" and art.spec.group_names == tuple(names)
    assert SpaceSpec.from_dict(art.spec.to_dict()) == art.spec
    old = SpaceSpec().to_dict()
    del old["granularity"], old["group_names"]  # an artifact written before granularities existed
    assert SpaceSpec.from_dict(old) == SpaceSpec()
    with pytest.raises(ValueError, match="group names"):
        SpaceSpec(granularity="module")
