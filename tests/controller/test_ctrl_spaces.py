"""Spaces: features come only from the released record; spaces do not depend on the number of modules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from accounting.events import PrivacyEvent
from controller.records import LedgerState, Released, ValidationStats
from controller.spaces import SpaceSpec, features_from_released, pool_to_buckets, spread_to_modules

LEDGER = LedgerState(
    target_epsilon=2.0,
    delta=1e-5,
    epsilon_spent=0.5,
    steps_done=10,
    steps_total=40,
    sigma_floor=1.0,
    sigma_reference=1.1,
    sigma_current=1.2,
)
VALID = ValidationStats(loss=3.0, previous_loss=3.1, initial_loss=3.5)


def _release(summed: torch.Tensor, noise: torch.Tensor, *, k: int = 3, batch: float = 4.0) -> Released:
    """The engine's release of one group-split update: (clipped sum + noise) / B, summarized per group."""
    g = (summed + noise) / batch  # [K, d]
    return Released(
        step=3,
        group_names=tuple(f"h.{i}" for i in range(k)),
        group_sizes=(g.shape[1],) * k,
        clip_norms=(1.0,) * k,
        noise_stds=(0.5,) * k,
        expected_batch_size=batch,
        noisy_grad_sq_norms=tuple(float(x) for x in (g**2).sum(1)),
        noisy_cos_prev=(0.1,) * k,
    )


def test_features_ignore_private_inputs_that_the_release_hides():
    # Two private batches with very different per-example norms (what RLDP's state reads) but the same clipped
    # sum: the releases are equal, so the observations must be equal.
    torch.manual_seed(0)
    k, d = 3, 8
    g1 = torch.randn(k, d) * 0.1
    g2 = torch.randn(k, d) * 0.1
    h = torch.randn(k, d) * 0.05
    batch_a, batch_b = [g1, g2], [g1 + h, g2 - h]
    norms_a = [x.norm() for x in batch_a]
    norms_b = [x.norm() for x in batch_b]
    assert not torch.allclose(torch.stack(norms_a), torch.stack(norms_b))
    noise = torch.randn(k, d) * 0.5
    obs_a = features_from_released(
        _release(sum(batch_a), noise), LEDGER, VALID, spec=SpaceSpec(), reference_clips=[1.0] * k
    )
    obs_b = features_from_released(
        _release(sum(batch_b), noise), LEDGER, VALID, spec=SpaceSpec(), reference_clips=[1.0] * k
    )
    np.testing.assert_allclose(obs_a, obs_b, rtol=1e-5, atol=1e-6)


def test_feature_function_refuses_raw_batches_and_tensors():
    spec = SpaceSpec()
    with pytest.raises(TypeError, match="Released"):
        features_from_released(
            {"input_ids": torch.zeros(2, 3)}, LEDGER, VALID, spec=spec, reference_clips=[1.0]
        )
    with pytest.raises(TypeError, match="tuple of floats"):
        Released(
            step=0,
            group_names=("a",),
            group_sizes=(4,),
            clip_norms=(1.0,),
            noise_stds=(1.0,),
            expected_batch_size=2.0,
            noisy_grad_sq_norms=torch.ones(1),
            noisy_cos_prev=(0.0,),
        )
    with pytest.raises(TypeError, match="Python float"):
        Released(
            step=0,
            group_names=("a",),
            group_sizes=(4,),
            clip_norms=(1.0,),
            noise_stds=(1.0,),
            expected_batch_size=2.0,
            noisy_grad_sq_norms=(torch.tensor(1.0),),
            noisy_cos_prev=(0.0,),
        )
    # A privatized statistic without its ledger event is refused.
    with pytest.raises(ValueError, match="privacy event"):
        Released(
            step=0,
            group_names=("a",),
            group_sizes=(4,),
            clip_norms=(1.0,),
            noise_stds=(1.0,),
            expected_batch_size=2.0,
            noisy_grad_sq_norms=(1.0,),
            noisy_cos_prev=(0.0,),
            noisy_clip_fractions=(0.3,),
        )
    ok = Released(
        step=0,
        group_names=("a",),
        group_sizes=(4,),
        clip_norms=(1.0,),
        noise_stds=(1.0,),
        expected_batch_size=2.0,
        noisy_grad_sq_norms=(1.0,),
        noisy_cos_prev=(0.0,),
        noisy_clip_fractions=(0.3,),
        events=(
            PrivacyEvent(stage="sft", step=0, purpose="clip_count", sampling_rate=0.1, noise_multiplier=5.0),
        ),
    )
    obs = features_from_released(ok, LEDGER, VALID, spec=spec, reference_clips=[1.0])
    assert obs[-1] == 1.0 and obs.shape == (spec.obs_dim,)


@pytest.mark.parametrize("k", [1, 2, 4, 7, 24])
def test_spaces_do_not_depend_on_module_count(k):
    spec = SpaceSpec(buckets=4)
    rel = Released(
        step=1,
        group_names=tuple(map(str, range(k))),
        group_sizes=(16,) * k,
        clip_norms=(1.0,) * k,
        noise_stds=(2.0,) * k,
        expected_batch_size=8.0,
        noisy_grad_sq_norms=(0.5,) * k,
        noisy_cos_prev=(0.2,) * k,
    )
    obs = features_from_released(rel, LEDGER, VALID, spec=spec, reference_clips=[1.0] * k)
    assert obs.shape == (spec.obs_dim,) and spec.observation_space().contains(obs)
    clips, sigma = spec.decode_action(
        np.linspace(-1, 1, spec.act_dim), reference_clips=[1.0] * k, sigma_floor=1.5
    )
    assert len(clips) == k and all(1 / 4 - 1e-9 <= c <= 4 + 1e-9 for c in clips)
    assert math.isclose(sigma, 1.5 * 3.0)


def test_buckets_pool_and_spread():
    np.testing.assert_allclose(pool_to_buckets([1, 2, 3, 4, 5, 6, 7, 8], 4), [1.5, 3.5, 5.5, 7.5])
    # 2 modules, 4 buckets: empty buckets interpolate (flat at the ends).
    np.testing.assert_allclose(pool_to_buckets([0.0, 1.0], 4), [0.0, 0.0, 0.75, 1.0])
    np.testing.assert_allclose(spread_to_modules([1.0, 3.0], 4), [1.0, 1.5, 2.5, 3.0])


def test_decode_action_bounds_and_default():
    spec = SpaceSpec(clip_range=2.0, noise_range=4.0)
    clips, sigma = spec.decode_action(spec.default_action(), reference_clips=[0.5, 1.0], sigma_floor=2.0)
    assert clips == (0.5, 1.0) and sigma == 2.0
    clips, sigma = spec.decode_action(
        [50, -50, math.nan, 9, 9], reference_clips=[1.0, 1.0, 1.0], sigma_floor=1.0
    )
    assert max(clips) <= 2.0 + 1e-12 and min(clips) >= 0.5 - 1e-12 and sigma == 4.0


def test_the_zero_action_is_fixed_dp_sgd_and_only_positive_noise_actions_add_noise():
    """An untrained actor's mean is near 0: it must start at the baseline (reference clips, sigma at the floor),
    not inside the box's noise range."""
    spec = SpaceSpec(clip_range=2.0, noise_range=4.0)
    assert not spec.default_action().any()
    for a_sig, want in ((-1.0, 3.0), (-0.3, 3.0), (0.0, 3.0), (0.5, 6.0), (1.0, 12.0)):
        clips, sigma = spec.decode_action([0.0] * (spec.act_dim - 1) + [a_sig], reference_clips=[0.5, 1.0],
                                          sigma_floor=3.0)
        assert clips == (0.5, 1.0) and sigma == pytest.approx(want)


def test_an_artifact_of_the_previous_action_mapping_is_refused():
    d = SpaceSpec().to_dict()
    d["version"] = 1
    with pytest.raises(ValueError, match="spaces version 1"):
        SpaceSpec.from_dict(d)
