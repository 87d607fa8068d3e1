"""PPO math: log-probs, KL, token rewards, GAE against a reference loop, user-safe normalization, the clipped loss,
KL controllers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.rlhf.ppo import (
    AdaptiveKLController,
    BatchWhiteningError,
    FixedKLController,
    check_advantage_normalization,
    compute_token_rewards,
    entropy_from_logits,
    gae_advantages,
    kl_per_token,
    logprobs_from_logits,
    normalize_advantages,
    ppo_loss_per_record,
    rloo_advantages,
)

# ------------------------------------------------------------------------------------------------ references


def gae_reference(rewards: list[float], values: list[float], mask: list[int], gamma: float, lam: float):
    """GAE on ONE trajectory, written the textbook way over its list of real steps."""
    steps = [t for t, m in enumerate(mask) if m]
    adv = [0.0] * len(mask)
    ret = [0.0] * len(mask)
    last = 0.0
    for k in reversed(range(len(steps))):
        t = steps[k]
        next_v = values[steps[k + 1]] if k + 1 < len(steps) else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
        ret[t] = last + values[t]
    return adv, ret


def random_mask(gen: torch.Generator, R: int, T: int, *, holes: bool) -> torch.Tensor:
    """Ragged prefix masks (each row has 1..T real steps), optionally with masked holes inside."""
    lengths = torch.randint(1, T + 1, (R,), generator=gen)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    if holes:
        holes_ = torch.rand(R, T, generator=gen) < 0.3
        holes_[:, 0] = False  # keep >= 1 real step
        mask = mask * (~holes_).long()
    return mask


# ------------------------------------------------------------------------------------------ log-probs and KL


def test_logprobs_and_entropy_match_distributions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    lp = logprobs_from_logits(logits, labels)
    dist = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(lp, dist.log_prob(labels))
    torch.testing.assert_close(entropy_from_logits(logits), dist.entropy())


def test_kl_estimators_are_unbiased_for_the_true_kl() -> None:
    """Sampling a ~ pi, the mean of k1 and of k3 both approach KL(pi || pi_ref); k3 is never negative."""
    gen = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    logp, logq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    true_kl = float((logp.exp() * (logp - logq)).sum())
    a = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=gen)
    k1 = kl_per_token(logp[a][None], logq[a][None], estimator="k1")
    k3 = kl_per_token(logp[a][None], logq[a][None], estimator="k3")
    assert abs(float(k1.mean()) - true_kl) < 0.02
    assert abs(float(k3.mean()) - true_kl) < 0.02
    assert (k3 >= -1e-7).all() and (k1 < 0).any()
    with pytest.raises(ValueError, match="k1"):
        kl_per_token(logp[None], logq[None], estimator="k2")  # type: ignore[arg-type]


def test_token_rewards_by_hand() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 5.0], [-2.0, -1.0, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    score = torch.tensor([2.0, -1.0])
    r = compute_token_rewards(score, logprobs, ref, mask, beta=0.1)
    expected = torch.tensor([[-0.05, 0.1, 0.0 + 2.0, 0.0], [-0.1, 0.0, 0.0, -0.2 - 1.0]])
    torch.testing.assert_close(r, expected)


def test_token_rewards_refuse_empty_row_and_bad_beta() -> None:
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask row 1 has no action"):
        compute_token_rewards(torch.zeros(2), z, z, torch.tensor([[1, 0, 0], [0, 0, 0]]), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        compute_token_rewards(torch.zeros(2), z, z, torch.ones(2, 3), beta=-1.0)


# ------------------------------------------------------------------------------------------------------ GAE


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.0, 0.5)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_reference_loop(gamma: float, lam: float, holes: bool) -> None:
    gen = torch.Generator().manual_seed(int(gamma * 100 + lam * 10 + holes))
    R, T = 7, 9
    rewards, values = torch.randn(R, T, generator=gen), torch.randn(R, T, generator=gen)
    mask = random_mask(gen, R, T, holes=holes)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    for i in range(R):
        ref_adv, ref_ret = gae_reference(rewards[i].tolist(), values[i].tolist(), mask[i].tolist(), gamma, lam)
        torch.testing.assert_close(adv[i], torch.tensor(ref_adv), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret[i], torch.tensor(ref_ret), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    R=st.integers(1, 5),
    T=st.integers(1, 8),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    holes=st.booleans(),
)
def test_gae_no_leakage_across_trajectories_or_past_the_end(
    seed: int, R: int, T: int, gamma: float, lam: float, holes: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(R, T, generator=gen), torch.randn(R, T, generator=gen)
    mask = random_mask(gen, R, T, holes=holes)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    # Garbage at padded positions of every row, and arbitrary changes to row 0, leave other rows unchanged.
    noise_r, noise_v = torch.randn(R, T, generator=gen) * 100, torch.randn(R, T, generator=gen) * 100
    noise_r[:, ::2], noise_v[:, 1::2] = float("nan"), float("inf")  # padding may even be non-finite
    rewards2 = torch.where(mask == 1, rewards, noise_r)
    values2 = torch.where(mask == 1, values, noise_v)
    rewards2[0] += torch.randn(T, generator=gen)
    values2[0] += torch.randn(T, generator=gen)
    adv2, ret2 = gae_advantages(rewards2, values2, mask, gamma=gamma, lam=lam)
    assert torch.isfinite(adv2).all() and torch.isfinite(ret2).all()
    torch.testing.assert_close(adv2[1:], adv[1:])
    torch.testing.assert_close(ret2[1:], ret[1:])


def test_gae_terminal_reward_only_gamma1() -> None:
    """gamma=1, lambda=1, V=0: every step's advantage is the return, the final score."""
    rewards = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae_advantages(rewards, torch.zeros(1, 4), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[3.0, 3.0, 3.0, 0.0]]))
    torch.testing.assert_close(ret, adv)


# --------------------------------------------------------------------------------------------- normalization


@pytest.mark.parametrize("mode", ["batch", "global", "whiten", "Batch_Whiten", "running"])
def test_batch_whitening_is_refused_with_the_reason(mode: str) -> None:
    with pytest.raises(BatchWhiteningError, match="sensitivity") as info:
        normalize_advantages(torch.ones(2, 3), torch.ones(2, 3), mode=mode)
    assert "per_trajectory" in str(info.value) and "fixed" in str(info.value)
    with pytest.raises(BatchWhiteningError):
        check_advantage_normalization(mode)


def test_unknown_normalization_is_refused() -> None:
    with pytest.raises(ValueError, match="allowed: none, per_trajectory, fixed"):
        check_advantage_normalization("zscore")


def test_per_trajectory_whitening_is_per_row_and_independent() -> None:
    gen = torch.Generator().manual_seed(3)
    adv = torch.randn(4, 6, generator=gen) * 5 + 2
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    out = normalize_advantages(adv, mask, mode="per_trajectory")
    for i in (0, 1, 3):
        real = out[i][mask[i] == 1]
        assert abs(float(real.mean())) < 1e-5
        assert abs(float(real.pow(2).mean()) - 1.0) < 1e-3
    assert (out[mask == 0] == 0).all() and out[2, 0] == 0  # one step: centred to 0
    adv2 = adv.clone()
    adv2[0] *= 100
    torch.testing.assert_close(normalize_advantages(adv2, mask, mode="per_trajectory")[1:], out[1:])


def test_fixed_and_none_modes() -> None:
    adv = torch.tensor([[2.0, -4.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(normalize_advantages(adv, mask, mode="fixed", scale=2.0), torch.tensor([[1.0, -2.0, 0.0]]))
    torch.testing.assert_close(normalize_advantages(adv, mask, mode="none"), torch.tensor([[2.0, -4.0, 0.0]]))
    with pytest.raises(ValueError, match="public constant"):
        normalize_advantages(adv, mask, mode="fixed", scale=0.0)


# ---------------------------------------------------------------------------------------------------- loss


def ppo_reference(new, old, adv, v, v_old, ret, mask, clip_eps, value_clip, vf_coef):
    """Scalar, token-by-token transcription of the PPO objective for one record."""
    pg_sum, vf_sum, n = 0.0, 0.0, 0
    for t in range(len(mask)):
        if not mask[t]:
            continue
        ratio = math.exp(new[t] - old[t])
        pg_sum += max(-adv[t] * ratio, -adv[t] * min(max(ratio, 1 - clip_eps), 1 + clip_eps))
        v_c = v_old[t] + min(max(v[t] - v_old[t], -value_clip), value_clip)
        vf_sum += 0.5 * max((v[t] - ret[t]) ** 2, (v_c - ret[t]) ** 2)
        n += 1
    n = max(n, 1)
    return pg_sum / n + vf_coef * vf_sum / n


def test_ppo_loss_matches_hand_computation_and_zero_grad_where_clipped() -> None:
    old = torch.zeros(1, 4)
    # ratios: e^0.5 (clipped for A>0), e^-0.5 (clipped for A<0), e^0.1 (inside), e^0.5 with A<0 (unclipped: max picks
    # the unclipped, more pessimistic term)
    new = torch.tensor([[0.5, -0.5, 0.1, 0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    v_old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    v = torch.tensor([[0.5, 0.1, -0.5, 0.0]], requires_grad=True)
    ret = torch.tensor([[1.0, 0.0, 0.0, 2.0]])
    mask = torch.ones(1, 4)
    loss, stats = ppo_loss_per_record(new, old, adv, v, v_old, ret, mask, clip_eps=0.2, value_clip=0.2, vf_coef=0.1)
    expected = ppo_reference(new[0].tolist(), old[0].tolist(), adv[0].tolist(), v[0].tolist(), v_old[0].tolist(),
                             ret[0].tolist(), mask[0].tolist(), 0.2, 0.2, 0.1)
    assert loss.shape == (1,)
    assert abs(float(loss.detach()[0]) - expected) < 1e-6
    # Hand values of the policy term: [-1.2, 0.8, -2 e^0.1, e^0.5] / 4
    pg = (-1.2 + 0.8 - 2 * math.exp(0.1) + math.exp(0.5)) / 4
    assert abs(float(stats.policy_loss[0]) - pg) < 1e-6
    # Value term: token 0 clipped value 0.2 -> (0.2-1)^2=0.64 > (0.5-1)^2; token 1: 0.01 both; token 2: clipped
    # -0.2 -> 0.04 < 0.25 so unclipped; token 3: 4 both.
    vf = 0.5 * (0.64 + 0.01 + 0.25 + 4.0) / 4
    assert abs(float(stats.value_loss[0]) - vf) < 1e-6
    assert abs(float(stats.clipfrac[0]) - 0.5) < 1e-6 and abs(float(stats.value_clipfrac[0]) - 0.25) < 1e-6
    g_new, g_v = torch.autograd.grad(loss.sum(), [new, v])
    assert g_new[0, 0] == 0 and g_new[0, 1] == 0  # clipped: no policy gradient
    assert abs(float(g_new[0, 2]) - (-2 * math.exp(0.1) / 4)) < 1e-6
    assert abs(float(g_new[0, 3]) - (math.exp(0.5) / 4)) < 1e-6
    assert g_v[0, 0] == 0  # value clipped
    assert abs(float(g_v[0, 2]) - 0.1 * 0.5 * 2 * (-0.5) / 4) < 1e-6


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), clip_eps=st.floats(0.05, 0.5), value_clip=st.floats(0.05, 1.0),
       vf_coef=st.floats(0.0, 1.0))
def test_ppo_loss_matches_reference_on_random_ragged_batches(
    seed: int, clip_eps: float, value_clip: float, vf_coef: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    R, T = 4, 6
    new, old = (torch.randn(R, T, generator=gen) * 0.3 for _ in range(2))
    adv, v, v_old, ret = (torch.randn(R, T, generator=gen) for _ in range(4))
    mask = random_mask(gen, R, T, holes=True)
    loss, stats = ppo_loss_per_record(new, old, adv, v, v_old, ret, mask, clip_eps=clip_eps,
                                      value_clip=value_clip, vf_coef=vf_coef)
    for i in range(R):
        ref = ppo_reference(*(x[i].tolist() for x in (new, old, adv, v, v_old, ret, mask)), clip_eps, value_clip, vf_coef)
        assert abs(float(loss[i]) - ref) < 1e-4 * max(1.0, abs(ref))
    # Per-record independence: changing record 0 (and padding anywhere) leaves the others' losses and stats alone.
    new2 = new.clone()
    new2[0] += 1.0
    new2[mask == 0] = 50.0
    loss2, stats2 = ppo_loss_per_record(new2, old, adv, v, v_old, ret, mask, clip_eps=clip_eps,
                                        value_clip=value_clip, vf_coef=vf_coef)
    torch.testing.assert_close(loss2[1:], loss[1:])
    torch.testing.assert_close(stats2.approx_kl[1:], stats.approx_kl[1:])


def test_ppo_stats_are_per_record_and_detached() -> None:
    gen = torch.Generator().manual_seed(0)
    new = torch.randn(3, 4, generator=gen, requires_grad=True)
    old = new.detach().clone()
    z = torch.zeros(3, 4)
    ent = torch.rand(3, 4, generator=gen)
    loss, stats = ppo_loss_per_record(new, old, torch.ones(3, 4), z, z, z, torch.ones(3, 4), entropy=ent)
    for name in ("policy_loss", "value_loss", "approx_kl", "clipfrac", "value_clipfrac", "entropy"):
        s = getattr(stats, name)
        assert s.shape == (3,) and not s.requires_grad, name
    torch.testing.assert_close(stats.approx_kl, torch.zeros(3))  # new == old
    torch.testing.assert_close(stats.entropy, ent.mean(dim=1))
    torch.testing.assert_close(loss.detach(), torch.full((3,), -1.0))  # ratio 1, A 1, no value error


def test_ppo_value_clip_none_and_shape_errors() -> None:
    z = torch.zeros(2, 3)
    v = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    loss, stats = ppo_loss_per_record(z, z, z, v, z, z, torch.ones(2, 3), value_clip=None, vf_coef=1.0)
    torch.testing.assert_close(loss, torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="returns has shape"):
        ppo_loss_per_record(z, z, z, z, z, torch.zeros(2, 4), torch.ones(2, 3))


# --------------------------------------------------------------------------------------------- KL control


def test_adaptive_kl_controller_follows_ziegler() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL far above target: error clipped to +0.2, beta grows by 1 + 0.2 * 256 / 10000.
    assert math.isclose(ctl.update(released_kl=60.0, n_steps=256), 0.2 * (1 + 0.2 * 256 / 10000))
    b = ctl.value
    assert math.isclose(ctl.update(released_kl=4.5, n_steps=100), b * (1 - 0.2 * 100 / 10000))  # 4.5/6 - 1 = -0.25, clipped
    b = ctl.value
    assert math.isclose(ctl.update(released_kl=6.6, n_steps=1000), b * (1 + 0.1 * 1000 / 10000))
    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    other.load_state_dict(state)
    assert other.value == ctl.value and other.target == 6.0
    with pytest.raises(ValueError, match="released_kl must be finite"):
        ctl.update(released_kl=float("nan"), n_steps=1)


def test_fixed_kl_controller_never_moves() -> None:
    ctl = FixedKLController(0.05)
    assert ctl.update(released_kl=100.0, n_steps=1000) == 0.05 and ctl.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-1.0)


def test_per_record_losses_trace_under_vmap() -> None:
    """Per-sample-gradient engines built on torch.func call the loss on one record at a time ([1, ...]) under
    vmap; the losses must have no data-dependent control flow, and the per-record gradient must equal autograd's."""
    from torch.func import grad, vmap

    from trainers.rlhf.reward import bradley_terry_loss_per_record
    from trainers.rlhf.sft import causal_lm_loss_per_record

    gen = torch.Generator().manual_seed(0)
    R, T, V = 3, 5, 7
    new, old, adv, v, v_old, ret = (torch.randn(R, T, generator=gen) for _ in range(6))
    mask = random_mask(gen, R, T, holes=False).float()

    def one(new_i, v_i, old_i, adv_i, v_old_i, ret_i, m_i):
        args = (x[None] for x in (new_i, old_i, adv_i, v_i, v_old_i, ret_i, m_i))
        return ppo_loss_per_record(*args)[0].sum()

    g_new, g_v = vmap(grad(one, argnums=(0, 1)))(new, v, old, adv, v_old, ret, mask)
    new_, v_ = new.clone().requires_grad_(), v.clone().requires_grad_()
    ref_new, ref_v = torch.autograd.grad(ppo_loss_per_record(new_, old, adv, v_, v_old, ret, mask)[0].sum(), [new_, v_])
    torch.testing.assert_close(g_new, ref_new)
    torch.testing.assert_close(g_v, ref_v)

    logits = torch.randn(R, T, V, generator=gen)
    ids = torch.randint(0, V, (R, T), generator=gen)
    g_lm = vmap(grad(lambda lg, x, m: causal_lm_loss_per_record(lg[None], x[None], m[None]).sum()))(logits, ids, mask)
    lg_ = logits.clone().requires_grad_()
    torch.testing.assert_close(g_lm, torch.autograd.grad(causal_lm_loss_per_record(lg_, ids, mask).sum(), lg_)[0])
    c, r = torch.randn(R, generator=gen), torch.randn(R, generator=gen)
    g_bt = vmap(grad(lambda a, b: bradley_terry_loss_per_record(a[None], b[None]).sum()))(c, r)
    torch.testing.assert_close(g_bt, -torch.sigmoid(r - c))


def test_garbage_on_padding_cannot_poison_a_record() -> None:
    """Padding log-probs may be -inf or huge (pad tokens); the loss and gradients stay finite and unchanged."""
    gen = torch.Generator().manual_seed(5)
    new, old, adv, v, v_old, ret = (torch.randn(2, 4, generator=gen) for _ in range(6))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    clean, _ = ppo_loss_per_record(new, old, adv, v, v_old, ret, mask)
    new2, old2 = new.clone(), old.clone()
    new2[0, 2], old2[0, 2], old2[0, 3] = 0.0, -200.0, float("-inf")
    new2 = new2.requires_grad_()
    dirty, _ = ppo_loss_per_record(new2, old2, adv, v, v_old, ret, mask)
    torch.testing.assert_close(dirty.detach(), clean)
    (g,) = torch.autograd.grad(dirty.sum(), new2)
    assert torch.isfinite(g).all() and (g[0, 2:] == 0).all()


# ------------------------------------------------------------------------------------------------------ RLOO


def test_rloo_is_the_return_minus_the_mean_of_the_other_samples_of_the_prompt() -> None:
    # rows 0-2 answer prompt 7 (user 1), rows 3-4 prompt 2 (user 0); padding holds garbage that must not count
    rewards = torch.tensor([[0.0, 0.5, 1e9], [1.0, 1.0, 0.0], [2.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [3.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]])
    group, users = torch.tensor([7, 7, 7, 2, 2]), torch.tensor([1, 1, 1, 0, 0])
    adv = rloo_advantages(rewards, mask, group, users)
    returns = [0.5, 2.0, 2.0, -1.0, 4.0]
    expected = [0.5 - 2.0, 2.0 - 1.25, 2.0 - 1.25, -1.0 - 4.0, 4.0 + 1.0]
    for i in range(5):
        assert returns[i] - expected[i] != returns[i]  # the baseline is not zero anywhere in this case
        torch.testing.assert_close(adv[i], torch.where(mask[i].bool(), torch.tensor(expected[i]), torch.tensor(0.0)))
    # leave-one-out advantages are centred within each prompt: they sum to zero over its samples
    assert float(adv[:3, 0].sum()) == pytest.approx(0.0, abs=1e-6)


def test_rloo_reads_only_its_own_group() -> None:
    """Another user's rollouts (another group) cannot move this user's advantages: per-user sensitivity."""
    gen = torch.Generator().manual_seed(0)
    rewards, mask = torch.randn(6, 4, generator=gen), random_mask(gen, 6, 4, holes=False)
    group, users = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([5, 5, 6, 6, 7, 7])
    before = rloo_advantages(rewards, mask, group, users)
    changed = rewards.clone()
    changed[2:4] += 100.0 * torch.randn(2, 4, generator=gen)
    after = rloo_advantages(changed, mask, group, users)
    torch.testing.assert_close(after[[0, 1, 4, 5]], before[[0, 1, 4, 5]])
    assert not torch.allclose(after[2:4], before[2:4])


def test_rloo_refuses_a_lonely_sample_and_a_group_across_users() -> None:
    rewards, mask = torch.ones(3, 2), torch.ones(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        rloo_advantages(rewards, mask, torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="two users"):
        rloo_advantages(rewards[:2], mask[:2], torch.tensor([4, 4]), torch.tensor([0, 1]))
