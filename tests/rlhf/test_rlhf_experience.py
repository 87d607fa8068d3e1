"""Rollout record: masks from generated tokens, alignment of log-probs with Hugging Face generate, chunk
independence, minibatch selection."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from tests.tiny_models import tiny_gpt2
from trainers.rlhf.experience import (
    Experience,
    action_mask_from_response,
    make_experience,
    ppo_loss_on_experience,
    response_slice,
    rollout_masks,
)
from trainers.rlhf.heads import PolicyValueModel, ScoreModel
from trainers.rlhf.ppo import BatchWhiteningError, gae_advantages

V, EOS = 40, 0
SAMPLE_SEED = 3


def tiny_lm(seed: int) -> GPT2LMHeadModel:
    """GPT-2's default dropout, in eval mode: the rollout code must not depend on the mode it is handed."""
    return tiny_gpt2(vocab_size=V, dropout=True, seed=seed, bos_token_id=EOS, eos_token_id=EOS,
                     pad_token_id=EOS).eval()


def test_action_mask_stops_after_first_eos_even_when_pad_is_eos() -> None:
    resp = torch.tensor([[5, 7, EOS, EOS, EOS], [5, 6, 7, 8, 9], [EOS, EOS, EOS, EOS, EOS], [3, EOS, 4, EOS, 1]])
    assert action_mask_from_response(resp, eos_token_id=EOS).tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]
    ]
    prompt_am = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 1]])
    seqs = torch.cat([torch.ones(4, 2, dtype=torch.long), resp], dim=1)
    am, act = rollout_masks(seqs, prompt_am, eos_token_id=EOS)
    assert am.tolist()[0] == [0, 1, 1, 1, 1, 0, 0] and torch.equal(act, action_mask_from_response(resp, eos_token_id=EOS))


def test_response_slice_alignment() -> None:
    full = torch.arange(10).view(1, 10)
    assert response_slice(full, 4, 6).tolist() == [[3, 4, 5, 6, 7, 8]]
    with pytest.raises(ValueError, match="prompt_len must be >= 1"):
        response_slice(full, 0, 3)


@pytest.fixture(scope="module")
def rollout():
    """A real rollout: left-padded prompts, sampled with HF generate, scored by policy/ref/value/reward models."""
    policy, ref = tiny_lm(0), tiny_lm(1)
    actor = PolicyValueModel(policy).eval()
    rm = ScoreModel(tiny_lm(2)).eval()
    prompts = [torch.randint(1, V, (n,)) for n in (3, 5, 2, 4)]
    P = max(len(p) for p in prompts)
    prompt_ids = torch.full((4, P), EOS, dtype=torch.long)
    prompt_am = torch.zeros(4, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, P - len(p) :], prompt_am[i, P - len(p) :] = p, 1
    torch.manual_seed(SAMPLE_SEED)
    with torch.no_grad():
        out = policy.generate(
            input_ids=prompt_ids, attention_mask=prompt_am, do_sample=True, max_new_tokens=8,
            pad_token_id=EOS, eos_token_id=EOS, return_dict_in_generate=True, output_logits=True,
        )
        seqs = out.sequences
        am, act = rollout_masks(seqs, prompt_am, eos_token_id=EOS)
        policy_logits, values = actor(seqs, am)
        ref_logits = ref(input_ids=seqs, attention_mask=am,
                         position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
        scores = rm(seqs, am)
    gen_logits = torch.stack(out.logits, dim=1)  # [R, T, V] the sampler's logits
    lengths = act.sum(1)
    assert (lengths < act.shape[1]).any() and (lengths == act.shape[1]).any(), "seed should give ragged rollouts"
    return dict(seqs=seqs, am=am, act=act, P=P, policy_logits=policy_logits, ref_logits=ref_logits,
                values=values, scores=scores, gen_logits=gen_logits)


def build(r: dict, rows: slice = slice(None), **kw) -> Experience:
    args = dict(beta=0.1, gamma=1.0, lam=0.95, advantage_normalization="per_trajectory")
    args.update(kw)
    return make_experience(
        sequences=r["seqs"][rows], attention_mask=r["am"][rows], action_mask=r["act"][rows], prompt_len=r["P"],
        user_index=torch.tensor([7, 3, 7, 9])[rows], policy_logits=r["policy_logits"][rows],
        ref_logits=r["ref_logits"][rows], values=r["values"][rows], scores=r["scores"][rows], **args,
    )


def test_old_logprobs_match_the_sampler(rollout: dict) -> None:
    """The learner's re-scored log-probs equal the log-probs generate sampled with (position ids, slicing)."""
    exp = build(rollout)
    resp = exp.response_ids
    sampler = torch.log_softmax(rollout["gen_logits"].float(), -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    m = exp.action_mask.bool()
    torch.testing.assert_close(exp.old_logprobs[m], sampler[m], rtol=1e-4, atol=1e-4)


def test_experience_fields_are_consistent(rollout: dict) -> None:
    exp = build(rollout, advantage_normalization="none")
    R, T = exp.action_mask.shape
    assert exp.sequences.shape == (R, exp.prompt_len + T) and exp.user_index.tolist() == [7, 3, 7, 9]
    m = exp.action_mask.float()
    torch.testing.assert_close(exp.kl, (exp.old_logprobs - exp.ref_logprobs) * m)
    # Total reward of a trajectory = score - beta * sum KL.
    torch.testing.assert_close(exp.rewards.sum(1), exp.scores - 0.1 * exp.kl.sum(1), rtol=1e-5, atol=1e-5)
    adv, ret = gae_advantages(exp.rewards, exp.values, exp.action_mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(exp.advantages, adv)
    torch.testing.assert_close(exp.returns, ret)


def test_experience_is_per_record_chunkable(rollout: dict) -> None:
    whole = build(rollout)
    parts = [build(rollout, slice(0, 1)), build(rollout, slice(1, 4))]
    for name in ("old_logprobs", "ref_logprobs", "values", "kl", "rewards", "advantages", "returns"):
        torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name), msg=name)


def test_select_keeps_users_aligned(rollout: dict) -> None:
    exp = build(rollout)
    sub = exp.select(torch.tensor([2, 0]))
    assert sub.user_index.tolist() == [7, 7] and sub.prompt_len == exp.prompt_len
    assert torch.equal(sub.advantages, exp.advantages[[2, 0]]) and torch.equal(sub.sequences, exp.sequences[[2, 0]])


def test_make_experience_refuses_batch_whitening(rollout: dict) -> None:
    with pytest.raises(BatchWhiteningError):
        build(rollout, advantage_normalization="batch")
    with pytest.raises(ValueError, match="user_index must be an integer"):
        make_experience(
            sequences=rollout["seqs"], attention_mask=rollout["am"], action_mask=rollout["act"],
            prompt_len=rollout["P"], user_index=torch.zeros(4), policy_logits=rollout["policy_logits"],
            ref_logits=rollout["ref_logits"], values=rollout["values"], scores=rollout["scores"],
            beta=0.1, gamma=1.0, lam=0.95, advantage_normalization="none",
        )


def test_first_epoch_loss_on_experience(rollout: dict) -> None:
    """Before any update the ratio is 1: approx KL 0, nothing clipped, policy loss = -mean advantage per record;
    the gradient reaches the policy logits only through the record's own actions."""
    exp = build(rollout)
    logits = rollout["policy_logits"].clone().requires_grad_()
    values = rollout["values"].clone()
    loss, stats = ppo_loss_on_experience(exp, logits, values, clip_eps=0.2, value_clip=0.2, vf_coef=0.1,
                                         with_entropy=True)
    m = exp.action_mask.float()
    torch.testing.assert_close(stats.approx_kl, torch.zeros(4), atol=1e-6, rtol=0)
    assert (stats.clipfrac == 0).all() and stats.entropy is not None and (stats.entropy > 0).all()
    torch.testing.assert_close(stats.policy_loss, -(exp.advantages * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(loss[1], logits)
    assert g[[0, 2, 3]].abs().sum() == 0 and g[1, : exp.prompt_len - 1].abs().sum() == 0
