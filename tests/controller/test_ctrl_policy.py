"""The controller on the real DP engine and ledger: finishes its planned steps within budget, transfers across
depth, and its checkpoint restores the same state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from accounting.verify import verify_run
from controller.artifact import Provenance
from controller.budget import BudgetGuard
from controller.config import ControllerConfig, ProxyEnvConfig
from controller.policy import LearnedController
from tests.controller import ctrl_helpers as H

TARGET, DELTA, Q, USERS = 1.0, 1e-5, 0.25, 24


def _order(steps: int) -> float:
    return BudgetGuard(target_epsilon=TARGET, delta=DELTA, sampling_rate=Q, steps=steps).rdp_order


def _controller(model, cfg: ControllerConfig, steps: int, **kw) -> LearnedController:
    return LearnedController(
        config=cfg,
        target_epsilon=TARGET,
        delta=DELTA,
        sampling_rate=Q,
        steps=steps,
        validation_loss=H.public_validation(model),
        rdp_order=_order(steps),
        stage="sft",
        **kw,
    )


def test_online_controller_finishes_within_budget_and_verifies(tmp_path):
    steps = 12
    model = H.tiny_lora_lm(2)
    cfg = ControllerConfig(interval=3, learning_starts=1, batch_size=4, gradient_steps=1, hidden=[16, 16])
    ctrl = _controller(model, cfg, steps)
    ledger = H.run_sft(
        model,
        ctrl,
        run_dir=tmp_path,
        target_epsilon=TARGET,
        delta=DELTA,
        q=Q,
        steps=steps,
        num_users=USERS,
        rdp_order=_order(steps),
    )
    assert len(ledger.events("sft")) == steps and ctrl.guard.steps_left == 0
    assert ledger.epsilon("sft") <= TARGET
    assert math.isclose(ledger.epsilon("sft"), ctrl.guard.epsilon_spent(), rel_tol=1e-6)
    result = verify_run(tmp_path)
    assert result.ok, result.mismatches
    assert len(ctrl.history) == steps // 3 and len(ctrl.learner.curve) == steps // 3
    # One decision per interval; the first (warm-up) took the default action: sigma at the floor.
    assert ctrl.learner.decisions == steps // 3
    assert math.isclose(ctrl.history[0]["sigma"], ctrl.guard.sigma_reference, rel_tol=1e-6)


def test_checkpoint_restores_the_same_controller(tmp_path):
    steps = 9
    model = H.tiny_lora_lm(2)
    cfg = ControllerConfig(interval=3, learning_starts=1, batch_size=4, gradient_steps=1, hidden=[16, 16])
    ctrl = _controller(model, cfg, steps)
    (tmp_path / "a").mkdir()
    H.run_sft(
        model,
        ctrl,
        run_dir=tmp_path / "a",
        target_epsilon=TARGET,
        delta=DELTA,
        q=Q,
        steps=6,
        num_users=USERS,
        rdp_order=_order(steps),
    )  # the first 6 of 9 planned steps
    ctrl.save(tmp_path / "ckpt")
    other = _controller(model, cfg, steps)
    other.load(tmp_path / "ckpt")
    assert other.guard.steps_done == 6 and other.guard.floor() == ctrl.guard.floor()
    assert other.learner.model.replay_buffer.size() == ctrl.learner.model.replay_buffer.size() == 2
    obs = np.asarray(ctrl._obs)
    a1, _ = ctrl.learner.model.predict(ctrl.learner.obs_norm(obs), deterministic=True)
    a2, _ = other.learner.model.predict(other.learner.obs_norm(obs), deterministic=True)
    np.testing.assert_allclose(a1, a2, atol=1e-6)


@pytest.fixture(scope="module")
def sb3_artifact(tmp_path_factory):
    """A controller trained by SB3 SAC on the 2-layer proxy env (a very short run)."""
    from controller.env import ProxyDPEnv
    from controller.sb3 import train_sb3

    env = ProxyDPEnv(
        ProxyEnvConfig(n_layer=2, steps=10, interval=5, base_pretrain_steps=5, train_texts=64, valid_texts=8)
    )
    cfg = ControllerConfig(learning_starts=2, batch_size=4, gradient_steps=1, hidden=[16, 16])
    out = tmp_path_factory.mktemp("artifact")
    learner, curve = train_sb3(
        env,
        config=cfg,
        episodes=3,
        norm_episodes=1,
        provenance=Provenance(trainer="sb3", model_layers=[2]),
        out=out,
    )
    return out, learner, env


def test_sb3_artifact_round_trip(sb3_artifact):
    from controller.artifact import load_artifact

    path, learner, env = sb3_artifact
    art = load_artifact(path)
    assert art.provenance.trainer == "sb3" and len(art.provenance.training_curve) == 3
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        obs, *_ = env.step(env.action_space.sample())
        expected, _ = learner.model.predict(learner.obs_norm(obs), deterministic=True)
        np.testing.assert_allclose(art.act(obs), expected, atol=1e-5)
    assert art.sb3_dir is not None  # finetune resumes the full SB3 state


def test_frozen_controller_transfers_to_deeper_model(sb3_artifact, tmp_path):
    path, _, _ = sb3_artifact
    steps = 6
    model = H.tiny_lora_lm(4)  # trained on 2 layers, runs on 4
    cfg = ControllerConfig(mode="frozen", load=str(path), interval=2, hidden=[16, 16])
    ctrl = _controller(model, cfg, steps)
    ledger = H.run_sft(
        model,
        ctrl,
        run_dir=tmp_path,
        target_epsilon=TARGET,
        delta=DELTA,
        q=Q,
        steps=steps,
        num_users=USERS,
        rdp_order=_order(steps),
    )
    assert len(ctrl.reference_clips) == 4 and len(ctrl.last_safe.clip_norms) == 4
    assert all(0.25 - 1e-9 <= c <= 4.0 + 1e-9 for c in ctrl.last_safe.clip_norms)
    assert len(ledger.events("sft")) == steps and ledger.epsilon("sft") <= TARGET
    assert verify_run(tmp_path).ok


def test_finetune_from_artifact_keeps_learning(sb3_artifact, tmp_path):
    path, learner, _ = sb3_artifact
    steps = 6
    model = H.tiny_lora_lm(2)
    cfg = ControllerConfig(
        mode="finetune",
        load=str(path),
        interval=2,
        learning_starts=2,
        batch_size=4,
        gradient_steps=1,
        hidden=[16, 16],
    )
    ctrl = _controller(model, cfg, steps)
    before = ctrl.learner.model.replay_buffer.size()
    H.run_sft(
        model,
        ctrl,
        run_dir=tmp_path,
        target_epsilon=TARGET,
        delta=DELTA,
        q=Q,
        steps=steps,
        num_users=USERS,
        rdp_order=_order(steps),
    )
    assert ctrl.learner.model.replay_buffer.size() == before + steps // 2


def test_controller_with_noisy_clip_counts_stays_within_budget(tmp_path):
    steps = 6
    model = H.tiny_lora_lm(2)
    cfg = ControllerConfig(
        interval=2, learning_starts=1, batch_size=4, gradient_steps=1, hidden=[16, 16], count_noise_std=3.0
    )
    ctrl = _controller(model, cfg, steps)
    ledger = H.run_sft(
        model,
        ctrl,
        run_dir=tmp_path,
        target_epsilon=TARGET,
        delta=DELTA,
        q=Q,
        steps=steps,
        num_users=USERS,
        rdp_order=_order(steps),
    )
    assert len(ledger.events("sft")) == steps and ledger.epsilon("sft") <= TARGET
    # The counts reached the observation (has_clip_counts) and their cost is in the recorded sigma_eff.
    assert ctrl._obs[-1] == 1.0
    assert math.isclose(ledger.events("sft")[0].noise_multiplier, ctrl.guard.events[0].noise_multiplier)
    assert verify_run(tmp_path).ok


def test_exploration_moves_actions_between_the_policy_mean_and_sacs_sample():
    """controller.exploration: 0 acts on the policy's mean (no exploration), 1 is SAC's own sample, between is
    the same fraction of the way; the warm-up action is the default either way."""
    from controller.sb3 import OnlineSAC

    def online(exploration: float) -> OnlineSAC:
        cfg = ControllerConfig(learning_starts=1, hidden=[8, 8], exploration=exploration, seed=3)
        return OnlineSAC.create(spec=cfg.spec(()), config=cfg)

    obs = np.linspace(-1.0, 1.0, online(1.0).spec.obs_dim).astype(np.float32)
    acts = {}
    for x in (0.0, 0.5, 1.0):
        sac = online(x)
        assert np.array_equal(sac.act(obs), sac.spec.default_action())  # warm-up: fixed DP-SGD
        mean = sac.act(obs, deterministic=True)
        sac.model.set_random_seed(11)
        acts[x] = (mean, sac.act(obs))
    mean = acts[0.0][0]
    assert np.array_equal(acts[0.0][1], mean)
    sample = acts[1.0][1]
    assert not np.allclose(sample, mean)  # SAC explores
    assert np.allclose(acts[0.5][1], mean + 0.5 * (sample - mean), atol=1e-6)
    with pytest.raises(Exception, match="controller.exploration"):
        ControllerConfig(exploration=1.5).check()


def test_entropy_coefficient_reaches_sac_and_lets_the_actor_follow_the_reward():
    """controller.ent_coef: SAC's default entropy term (learnt from 1) outweighs rewards of order 0.1 over a few
    decisions, so two controllers fed rewards that differ end with nearly the same actor; a small coefficient
    lets the reward move the actor."""
    import torch

    from controller.sb3 import OnlineSAC

    def actor_gap(ent_coef: str) -> float:
        actors = []
        for rewards in ((0.27, 0.12, 0.02, -0.02, -0.02, 0.01), (0.23, 0.12, 0.02, -0.01, -0.01, 0.02)):
            cfg = ControllerConfig(learning_starts=2, batch_size=16, gradient_steps=4, ent_coef=ent_coef, seed=0)
            sac = OnlineSAC.create(spec=cfg.spec(()), config=cfg)
            obs = np.zeros(sac.spec.obs_dim, np.float32)
            for i, r in enumerate(rewards):
                a = sac.act(obs + 0.01 * i)
                sac.add(obs + 0.01 * i, a, r, obs + 0.01 * (i + 1), False)
                sac.update()
            actors.append([p.detach().clone() for p in sac.model.actor.parameters()])
        return max(float((x - y).abs().max()) for x, y in zip(*actors, strict=True))

    cfg = ControllerConfig(ent_coef="0.001")
    assert float(OnlineSAC.create(spec=cfg.spec(()), config=cfg).model.ent_coef_tensor) == pytest.approx(0.001)
    cfg = ControllerConfig(ent_coef="auto_0.05")
    model = OnlineSAC.create(spec=cfg.spec(()), config=cfg).model
    assert float(torch.exp(model.log_ent_coef.detach())) == pytest.approx(0.05)
    assert actor_gap("0.001") > 100 * actor_gap("auto")
    for bad in ("auto_0", "-1", "often"):
        with pytest.raises(Exception, match="controller.ent_coef"):
            ControllerConfig(ent_coef=bad).check()
