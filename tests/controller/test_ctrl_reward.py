"""The controller's reward (controller/reward.py): the validation gain, and RLDP's gain per unit of budget spent, in
private runs and in the proxy pretraining episodes alike."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.budget import BudgetGuard
from controller.config import ControllerConfig, ProxyEnvConfig
from controller.policy import LearnedController
from controller.reward import interval_reward
from dpalign.config import ConfigError
from tests.controller import ctrl_helpers as H

TARGET, DELTA, Q, USERS = 1.0, 1e-5, 0.25, 24


def _reward(kind: str, *, budget_share: float, pace_share: float = 0.1, loss: float = 1.8) -> float:
    return interval_reward(
        kind=kind, previous_loss=2.0, loss=loss, initial_loss=2.5, scale=100.0,
        budget_share=budget_share, pace_share=pace_share,
    )


def test_gain_per_budget_divides_the_gain_by_the_share_of_an_even_pace():
    gain = 100.0 * 0.2 / 2.5
    assert math.isclose(_reward("validation_gain", budget_share=0.05), gain)
    assert math.isclose(_reward("gain_per_budget", budget_share=0.1), gain)  # even pace: the same reward
    assert math.isclose(_reward("gain_per_budget", budget_share=0.05), 2 * gain)  # half the budget, twice
    assert math.isclose(_reward("gain_per_budget", budget_share=0.2), gain / 2)
    # A loss increase bought cheaply is penalised as strongly as a gain is rewarded.
    assert math.isclose(_reward("gain_per_budget", budget_share=0.05, loss=2.2), -2 * gain)
    # The penalty term applies to either form.
    with_penalty = interval_reward(
        kind="gain_per_budget", previous_loss=2.0, loss=1.8, initial_loss=2.5, scale=100.0,
        budget_share=0.1, pace_share=0.1, epsilon_share=0.3, privacy_penalty=2.0,
    )
    assert math.isclose(with_penalty, gain - 0.6)
    with pytest.raises(ValueError, match="controller.reward"):
        _reward("perplexity", budget_share=0.1)


def test_budget_share_is_additive_rdp_over_the_plan():
    steps = 20
    guard = BudgetGuard(target_epsilon=2.0, delta=1e-5, sampling_rate=0.05, steps=steps)
    assert guard.budget_share() == 0.0
    for i in range(1, 6):  # every step at the reference sigma costs 1/steps, not epsilon's sqrt-shaped share
        guard.record(guard.event(guard.sigma_reference))
        assert math.isclose(guard.budget_share(), i / steps, rel_tol=1e-3)  # the floor rounds sigma up
    before = guard.budget_share()
    guard.record(guard.event(3 * guard.sigma_reference))  # more noise: a smaller share
    assert 0 < guard.budget_share() - before < 0.2 / steps
    while guard.steps_left:
        guard.record(guard.event(guard.safe_action(clip_norms=[1.0], sigma=0.0).noise_multiplier))
    assert 0.99 < guard.budget_share() <= 1.0 + 1e-6  # the plan spent the budget, within the floor's tolerance


def test_config_refuses_an_unknown_reward():
    with pytest.raises(ConfigError, match="controller.reward"):
        ControllerConfig(reward="perplexity").check()
    with pytest.raises(ConfigError, match="controller.env.reward"):
        ProxyEnvConfig(reward="perplexity").check()


def test_private_run_rewards_gain_per_budget_from_its_ledger(tmp_path):
    """A real DP run: every interval's reward is RLDP's form of that interval's public validation losses and the
    budget shares the guard recorded, and intervals that spent less than the even pace earn more than their gain."""
    steps, interval = 12, 3
    model = H.tiny_lora_lm(2)
    cfg = ControllerConfig(
        interval=interval, learning_starts=1, batch_size=4, gradient_steps=1, hidden=[16, 16],
        reward="gain_per_budget", noise_range=3.0, exploration=1.0,
    )
    order = BudgetGuard(target_epsilon=TARGET, delta=DELTA, sampling_rate=Q, steps=steps).rdp_order
    ctrl = LearnedController(
        config=cfg, target_epsilon=TARGET, delta=DELTA, sampling_rate=Q, steps=steps,
        validation_loss=H.public_validation(model), rdp_order=order, stage="sft",
    )
    ledger = H.run_sft(
        model, ctrl, run_dir=tmp_path, target_epsilon=TARGET, delta=DELTA, q=Q, steps=steps,
        num_users=USERS, rdp_order=order,
    )
    assert ledger.epsilon("sft") <= TARGET
    assert len(ctrl.history) == steps // interval
    initial = ctrl._initial_loss
    prev_loss, prev_share, prev_step = initial, 0.0, 0
    ratios = []
    for h in ctrl.history:
        share = h["budget_share"] - prev_share
        pace = (h["step"] - prev_step) / steps
        expected = interval_reward(
            kind="gain_per_budget", previous_loss=prev_loss, loss=h["validation_loss"], initial_loss=initial,
            scale=cfg.reward_scale, budget_share=share, pace_share=pace,
        )
        assert math.isclose(h["reward"], expected, rel_tol=1e-9)
        ratios.append(pace / share)
        prev_loss, prev_share, prev_step = h["validation_loss"], h["budget_share"], h["step"]
    # The intervals' shares add up to the whole budget: an interval cheaper than the pace makes another dearer.
    assert 0.99 < ctrl.guard.budget_share() <= 1.0 + 1e-6
    assert not np.allclose(ratios, 1.0)  # the exploring controller moved sigma off the even pace


def test_proxy_episode_rewards_as_a_private_run_does():
    from controller.env import ProxyDPEnv

    cfg = ProxyEnvConfig(
        n_layer=1, steps=8, interval=4, base_pretrain_steps=2, train_texts=16, valid_texts=4,
        reward="gain_per_budget", target_epsilons=[2.0],
    )
    env = ProxyDPEnv(cfg)
    env.reset(seed=0)
    action = np.zeros(env.action_space.shape, dtype=np.float32)
    action[-1] = 1.0  # the most noise the spaces allow: a third of the even pace's RDP budget or less
    prev = env.prev_loss
    share_before = env.guard.budget_share()
    _, reward, _, _, info = env.step(action)
    share = env.guard.budget_share() - share_before
    assert share < 0.5 * 4 / 8
    gain = cfg.reward_scale * (prev - info["validation_loss"]) / env.initial_loss
    assert math.isclose(reward, gain * (4 / 8) / share, rel_tol=1e-9)
