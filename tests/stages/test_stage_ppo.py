"""DP-PPO recipe end to end on tiny models: accounting of K epochs as repeats of one sample, the exported policy,
the non-private baseline, a refused stage, PPO ratio 1 at the first epoch, and Ray rollouts equal to in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from accounting.events import PrivacyEvent
from accounting.ledger import Ledger, read_ledger
from launch.config import load_config
from launch.pipeline.metrics import MetricsLogger
from launch.schema import RunConfig
from tests.stages.sampling_probe import assert_samples_follow_the_ledger, recorded_samples
from tests.tiny_models import SENTENCES, save_model_dir, tiny_lm_for
from trainers.stages.context import StageContext

EVAL_PROMPTS = ["the movie was", "i think the plot", "a great cast", "the ending"]
NUM_USERS = 12
TARGET_EPS, TARGET_DELTA = 4.0, 1e-3
OVERRIDES = [
    "ppo.iterations=2",
    "ppo.ppo_epochs=2",
    "ppo.expected_users_per_iteration=4",
    "ppo.max_new_tokens=6",
    "ppo.rollout_batch_size=4",
    "ppo.rollout_actors=2",
    "ppo.lr=0.01",
    "ppo.lora.alpha=8",
    "engine.max_physical_batch_records=4",
    "run.reproducible_noise=true",  # runs are compared bit for bit (in process vs Ray, crash vs uninterrupted)
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A tiny 'SFT' GPT-2 + tokenizer, a reward-model dir (same backbone + a ScoreModel head) and a D3 file."""
    from trainers.data.io import write_jsonl
    from trainers.rlhf.heads import ScoreModel

    root = tmp_path_factory.mktemp("ppo_stage")
    sft = tiny_lm_for(tiny_tokenizer, n_positions=64, dropout=True)  # dropout 0.1: the recipe must use eval mode
    save_model_dir(root / "sft", sft, tiny_tokenizer)
    save_model_dir(root / "rm" / "backbone", sft, tiny_tokenizer)
    torch.manual_seed(1)
    rm = ScoreModel(sft, head_init_std=1.0)
    rm.save_head(root / "rm" / "head.safetensors")
    rows = []
    for u in range(NUM_USERS):
        for j in range(1 + u % 2):  # 1 or 2 records per user: a user's records are one unit
            words = SENTENCES[(u + j) % len(SENTENCES)].split()
            rows.append({"user_id": f"user-{u:02d}", "prompt": " ".join(words[: 2 + (u + j) % 3])})
    write_jsonl(root / "d3.jsonl", rows)
    return {"root": root, "sft": root / "sft", "rm": root / "rm", "d3": root / "d3.jsonl"}


def make_cfg(*extra: str) -> RunConfig:
    return load_config(RunConfig, None, [*OVERRIDES, *extra])


SEED = 3


def make_ctx(cfg: RunConfig, *, private: bool, ledger: Ledger | None, metrics=None, target=TARGET_EPS) -> StageContext:
    return StageContext(
        stage="ppo",
        cfg=cfg,
        private=private,
        ledger=ledger,
        metrics=metrics,
        target_epsilon=target if private else None,
        target_delta=TARGET_DELTA if private else None,
        seed=SEED,
        progress=False,
        eval_prompts=EVAL_PROMPTS,
    )


def run(dirs, ctx: StageContext, out: Path, **kw):
    from trainers.stages.ppo import run_ppo

    return run_ppo(ctx, sft_dir=dirs["sft"], rm_dir=dirs["rm"], prompts_path=str(dirs["d3"]), out_dir=out, **kw)


@pytest.fixture(scope="module")
def private_run(dirs):
    """One private in-process run of 2 iterations with K=2, with a real ledger and metrics logger."""
    root = dirs["root"] / "private"
    ledger = Ledger.open(root / "ledger.jsonl", run_id="t", target_epsilon=TARGET_EPS, target_delta=TARGET_DELTA,
                         composition="parallel")
    metrics = MetricsLogger(root / "tb", root / "metrics.jsonl")
    try:
        with recorded_samples() as samples:
            summary = run(dirs, make_ctx(make_cfg(), private=True, ledger=ledger, metrics=metrics), root / "out",
                          use_ray=False)
        eps = ledger.epsilon("ppo")
    finally:
        metrics.close()
        ledger.close()
    return {"summary": summary, "root": root, "eps": eps, "samples": samples}


def test_ppo_samples_are_poisson_at_the_ledger_rate(private_run):
    events = [e for e in read_ledger(private_run["root"] / "ledger.jsonl").events if e.stage == "ppo"]
    assert_samples_follow_the_ledger(private_run["samples"], events, seed=3, num_users=NUM_USERS)


def test_private_run_accounts_epochs_as_repeats(private_run):
    import dp_accounting

    s, root = private_run["summary"], private_run["root"]
    assert s["status"] == "completed" and s["steps"] == 2 and s["ppo_epochs"] == 2
    assert s["num_users"] == NUM_USERS and s["sampling_rate"] == pytest.approx(4 / NUM_USERS)
    contents = read_ledger(root / "ledger.jsonl")
    events = [e for e in contents.events if e.stage == "ppo"]
    assert len(events) == 2, "one event per sampled batch, not one per epoch"
    for step, e in enumerate(events):
        assert (e.step, e.purpose, e.repeats) == (step, "gradient", 2)
        assert e.sampling_rate == pytest.approx(4 / NUM_USERS)
        assert e.noise_multiplier == pytest.approx(s["noise_multiplier"], rel=1e-9)
    assert contents.stage_end["ppo"]["status"] == "completed"
    # recompute with dp-accounting alone: 2 x PoissonSampled(q, Gaussian(sigma / sqrt(K)))
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(4 / NUM_USERS, dp_accounting.GaussianDpEvent(s["noise_multiplier"] / 2**0.5)), 2)
    reference = acc.get_epsilon(TARGET_DELTA)
    assert private_run["eps"] == pytest.approx(reference, rel=0.01)
    assert s["epsilon"] == pytest.approx(private_run["eps"]) and s["epsilon"] <= TARGET_EPS
    # counting the epochs as fresh steps would have cost less: the repeats really are in the ledger
    fresh = dp_accounting.pld.PLDAccountant()
    fresh.compose(dp_accounting.PoissonSampledDpEvent(4 / NUM_USERS, dp_accounting.GaussianDpEvent(s["noise_multiplier"])), 4)
    assert fresh.get_epsilon(TARGET_DELTA) < 0.95 * reference

    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    keys = {r["key"] for r in rows}
    assert {"privacy/epsilon", "privacy/sigma_eff", "ppo/kl", "ppo/reward", "ppo/clipfrac", "eval/gold_reward"} <= keys
    assert "perf/steps_per_sec" not in keys  # wall time depends on the private batch size: not logged when private
    gold = [r for r in rows if r["key"] == "eval/gold_reward"]
    assert [r["step"] for r in gold] == [0, 1, 2]  # before training and after every iteration
    assert all(not r.get("private", False) for r in rows)
    assert [h["iteration"] for h in s["history"]] == [0, 1, 2]


def test_export_loads_and_equals_adapted_policy(private_run, dirs):
    from transformers import AutoModelForCausalLM

    from trainers.models.lora import load_lora
    from trainers.rlhf.heads import PolicyValueModel

    out = private_run["root"] / "out"
    merged = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    adapted = load_lora(str(dirs["sft"]), out / "adapter")
    sft = AutoModelForCausalLM.from_pretrained(str(dirs["sft"])).eval()
    ids = torch.tensor([[0, 5, 9, 17, 33, 60, 2]])
    with torch.no_grad():
        a, m, base = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, sft(input_ids=ids).logits
    torch.testing.assert_close(m, a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m, base, atol=1e-6), "PPO updates must have moved the policy off the SFT model"
    PolicyValueModel(sft).load_head(out / "value_head.safetensors")  # the value head file is a valid head
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_first_epoch_ratio_is_one_and_logprobs_match_generate(dirs):
    """Left padding + mask-derived positions: the learner's log-probs equal the sampler's, so the PPO ratio is
    exactly 1 at release 0 (approx_kl ~ 0, clipfrac 0), for the whole batch and for any micro-batch of it."""
    from trainers.models.tokenizer import padding_side
    from trainers.rlhf.experience import ppo_loss_on_experience
    from trainers.rlhf.models import load_ppo_models
    from trainers.rlhf.rollout_batch import build_experience, pad_rollouts
    from trainers.rollout import generate_rollouts

    cfg = make_cfg()
    models = load_ppo_models(sft_dir=dirs["sft"], rm_dir=dirs["rm"], lora=cfg.ppo.lora, seed=SEED)
    with torch.no_grad():  # a non-zero adapter, so the policy differs from the reference
        for n, p in models.policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    tok = models.tokenizer
    prompts = ["the", "i loved the music and the", "a dull", "what a wonderful and"]
    gen = generate_rollouts(models.policy, tok, prompts, max_new_tokens=6, temperature=1.0, top_k=0, seed=5,
                            batch_size=4)
    padded = pad_rollouts(gen, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    exp = build_experience(models, padded, torch.tensor([0, 1, 1, 2]), beta=0.1, objective=cfg.ppo.objective,
                           chunk_records=3)
    # generate's own logits of the greedy continuation of the same left-padded batch
    with padding_side(tok, "left"):
        enc = tok([tok.eos_token + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = models.policy.generate(**enc, do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id, return_dict_in_generate=True, output_logits=True)
    greedy = [type(gen[0])(enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist(),
                           out.sequences[i, enc["input_ids"].shape[1]:].tolist(), "") for i in range(4)]
    g_pad = pad_rollouts(greedy, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    g_exp = build_experience(models, g_pad, torch.arange(4), beta=0.1, objective=cfg.ppo.objective, chunk_records=4)
    gen_lp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, g_pad.sequences[:, g_pad.prompt_len:, None])[..., 0]
    torch.testing.assert_close(g_exp.old_logprobs, gen_lp * g_pad.action_mask, rtol=1e-4, atol=1e-4)

    for index in (torch.arange(4), torch.tensor([2]), torch.tensor([1, 3])):
        mb = exp.select(index)
        logits, values = models.actor(mb.sequences, mb.attention_mask)
        loss, stats = ppo_loss_on_experience(mb, logits, values, clip_eps=0.2, value_clip=0.2, vf_coef=0.1)
        assert stats.approx_kl.abs().max() < 1e-6 and stats.clipfrac.max() == 0
    assert exp.kl.abs().sum() > 0 and torch.isfinite(exp.advantages).all()


def test_nonprivate_writes_no_events(dirs, tmp_path):
    """The baseline: same path, no ledger traffic. Also covers an empty Poisson sample (seed 3, q = 1/12: the
    third sample is empty), an adaptive beta fed the public KL, per-trajectory advantages and public LM loss."""
    from trainers.engine.sampling import PoissonUserSampler

    samples = [PoissonUserSampler(NUM_USERS, sampling_rate=1 / NUM_USERS, seed=3).sample(t).numel() for t in range(3)]
    assert samples[0] > 0 and samples[2] == 0
    cfg = make_cfg(
        "ppo.iterations=3", "ppo.ppo_epochs=2", "ppo.expected_users_per_iteration=1",
        "ppo.objective.kl_controller=adaptive", "ppo.objective.kl_target=0.001", "ppo.objective.kl_horizon=10",
        "ppo.objective.advantage_normalization=per_trajectory",
    )
    ledger = Ledger.open(tmp_path / "ledger.jsonl", run_id="np", target_epsilon=TARGET_EPS,
                         target_delta=TARGET_DELTA, composition="parallel")
    metrics = MetricsLogger(tmp_path / "tb", tmp_path / "metrics.jsonl")
    windows = torch.randint(1, 200, (3, 16), generator=torch.Generator().manual_seed(0))
    try:
        s = run(dirs, make_ctx(cfg, private=False, ledger=ledger, metrics=metrics), tmp_path / "out",
                use_ray=False, public_windows=windows)
    finally:
        metrics.close()
        ledger.close()
    contents = read_ledger(tmp_path / "ledger.jsonl")
    assert contents.events == [] and "ppo" not in contents.stages
    assert s["status"] == "completed" and s["steps"] == 3
    assert s["epsilon"] is None and s["noise_multiplier"] is None
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    public_kl = [r["value"] for r in rows if r["key"] == "ppo/kl" and r["step"] >= 1]
    assert len(public_kl) == 3 and all(k >= 0 for k in public_kl)
    beta = cfg.ppo.objective.init_kl_coef  # beta is a function of the logged PUBLIC KLs only
    for kl in public_kl:
        beta *= 1 + min(max(kl / 0.001 - 1, -0.2), 0.2) * 1 / 10
    assert s["beta_final"] == pytest.approx(beta, rel=1e-9) and s["beta_final"] != cfg.ppo.objective.init_kl_coef
    keys = {r["key"] for r in rows}
    assert "eval/public_lm_loss" in keys and "charts/beta" in keys
    assert not any(k.startswith("privacy/") for k in keys)
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_adaptive_beta_without_public_prompts_is_refused(dirs, tmp_path):
    ctx = make_ctx(make_cfg("ppo.objective.kl_controller=adaptive"), private=False, ledger=None)
    ctx.eval_prompts = None
    with pytest.raises(ValueError, match="kl_controller=adaptive needs a released or public KL"):
        run(dirs, ctx, tmp_path / "out", use_ray=False)


def test_spent_budget_stops_the_stage_as_refused(dirs, tmp_path):
    """Sequential composition: another stage already spent the run's budget, so the filter refuses PPO's first
    step; nothing is released and the ledger says why."""
    ledger = Ledger.open(tmp_path / "ledger.jsonl", run_id="r", target_epsilon=TARGET_EPS,
                         target_delta=TARGET_DELTA, composition="sequential")
    try:
        ledger.begin_stage("sft", user_fingerprint="x", num_users=10, target_delta=TARGET_DELTA)
        ledger.record(PrivacyEvent("sft", 0, "gradient", 1.0, 0.3), enforce=False)  # epsilon >> TARGET_EPS
        assert ledger.epsilon() > TARGET_EPS
        # PPO's own schedule fits its target (calibrated), but the run's sequential budget is gone
        s = run(dirs, make_ctx(make_cfg(), private=True, ledger=ledger), tmp_path / "out", use_ray=False)
    finally:
        ledger.close()
    contents = read_ledger(tmp_path / "ledger.jsonl")
    assert s["status"] == "refused" and s["steps"] == 0 and "budget" in s["reason"]
    assert [e.stage for e in contents.events] == ["sft"]
    assert contents.stage_end["ppo"]["status"] == "refused"


def test_minibatches_refused_at_config_load_and_by_the_recipe(dirs, tmp_path):
    from dataclasses import replace

    from launch.config import ConfigError
    from trainers.stages.ppo import UnsupportedPPOConfig

    with pytest.raises(ConfigError, match="ppo.minibatches: only 1 is supported"):
        make_cfg("ppo.minibatches=2")
    # A config built in code (skipping the loader) is still refused before the ledger is touched.
    cfg = make_cfg()
    cfg.ppo = replace(cfg.ppo, minibatches=2)
    ledger = Ledger.open(tmp_path / "ledger.jsonl", run_id="m", target_epsilon=TARGET_EPS, target_delta=TARGET_DELTA)
    try:
        with pytest.raises(UnsupportedPPOConfig, match="ppo.minibatches=2"):
            run(dirs, make_ctx(cfg, private=True, ledger=ledger), tmp_path / "out")
    finally:
        ledger.close()
    assert read_ledger(tmp_path / "ledger.jsonl").stages == {}


@pytest.mark.slow  # ~40 s on 2 shared cores: Ray start-up plus a full Ray run
def test_ray_rollouts_equal_in_process(dirs, private_run, ray_module, tmp_path):
    """2 Ray actors (LoRA-only sync) give the same rollouts as in-process generation, so the private Ray run
    trains exactly the same policy as the in-process one."""
    from trainers.data.io import load_prompts
    from trainers.engine.sampling import PoissonUserSampler
    from trainers.rlhf.models import load_ppo_models
    from trainers.stages.context import UserIndex
    from trainers.stages.ppo import _Rollouts, rollout_seed

    cfg = make_cfg()
    ctx = make_ctx(cfg, private=False, ledger=None)
    data = load_prompts(dirs["d3"])
    users = UserIndex.from_ids(list(data.rows["user_id"]))
    records = users.records_of(PoissonUserSampler(users.num_users, sampling_rate=4 / NUM_USERS, seed=3).sample(0))
    prompts = [data.rows["prompt"][i] for i in records.tolist()]
    assert len(prompts) >= 2
    models = load_ppo_models(sft_dir=dirs["sft"], rm_dir=dirs["rm"], lora=ctx.cfg.ppo.lora, seed=ctx.seed)
    ray_gen = _Rollouts(models, sft_dir=dirs["sft"], cfg=cfg.ppo, use_ray=True)
    try:
        ray_gen.sync()
        local = _Rollouts(models, sft_dir=dirs["sft"], cfg=cfg.ppo, use_ray=False)
        assert ray_gen.generate(prompts, seed=rollout_seed(3, 0)) == local.generate(prompts, seed=rollout_seed(3, 0))
    finally:
        ray_gen.shutdown()

    ledger = Ledger.open(tmp_path / "ledger.jsonl", run_id="t", target_epsilon=TARGET_EPS, target_delta=TARGET_DELTA,
                         composition="parallel")
    try:
        s = run(dirs, make_ctx(cfg, private=True, ledger=ledger), tmp_path / "out", use_ray=True)
    finally:
        ledger.close()
    assert s["rollout"]["ray_actors"] == 2 and s["rollout"]["sync_count"] == 3  # initial + after each iteration
    assert s["rollout"]["sync_bytes"] > 0
    assert s["history"] == private_run["summary"]["history"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(private_run["root"] / "out" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rollouts_are_scored_eos_terminated_like_the_reward_model_was_trained(dirs, tmp_path):
    """The RM reads its score at EOS (rm_texts layout): a rollout cut by max_new_tokens gets EOS appended before
    scoring; one that generated EOS is scored as it is; padding never changes a score."""
    from trainers.rlhf.models import load_ppo_models
    from trainers.rlhf.rollout_batch import reward_scores, with_eos

    eos, pad = 7, 7  # GPT-2 style: pad == eos, the mask tells them apart
    seq = torch.tensor([[pad, 3, 4, 5, 6, pad],   # left-padded prompt, open response (cut)
                        [1, 2, 3, 9, eos, pad]])  # response ended with its own EOS
    am = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    s2, a2 = with_eos(seq, am, eos_id=eos, pad_id=pad)
    assert s2.tolist() == [[pad, 3, 4, 5, 6, eos, pad], [1, 2, 3, 9, eos, pad, pad]]
    assert a2.tolist() == [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]]

    cfg = make_cfg()
    models = load_ppo_models(sft_dir=dirs["sft"], rm_dir=dirs["rm"], lora=cfg.ppo.lora, seed=SEED)
    tok_eos = int(models.tokenizer.eos_token_id)
    body = [5, 6, 8, 9, 10]
    padded = torch.tensor([[tok_eos, tok_eos, *body, tok_eos, tok_eos]])  # pads around an open row
    padded_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 0]])
    alone = torch.tensor([[*body, tok_eos]])
    expected = models.reward(alone, torch.ones_like(alone))
    assert torch.allclose(reward_scores(models, padded, padded_mask), expected, atol=1e-5)
    assert not torch.allclose(models.reward(padded, padded_mask), expected, atol=1e-3)  # without EOS: another score


def test_public_reward_normalization_is_folded_into_the_head_and_kept(dirs, tmp_path):
    """reward_normalization=public: the RM's scores of SFT samples on public prompts get mean 0, std 1 (the same
    samples, re-scored after the fold); the run reports the constants; without public prompts it is refused."""
    from trainers.rlhf.models import load_ppo_models
    from trainers.rlhf.public_eval import normalize_score_head, public_reward_norm
    from trainers.rlhf.rollout_batch import reward_scores

    cfg = make_cfg("ppo.objective.reward_normalization=public")
    models = load_ppo_models(sft_dir=dirs["sft"], rm_dir=dirs["rm"], lora=cfg.ppo.lora, seed=SEED)
    norm = public_reward_norm(models, EVAL_PROMPTS, cfg=cfg.ppo, seed=5, seeds=2, chunk_records=8)
    assert norm["samples"] == 2 * len(EVAL_PROMPTS) and norm["scale"] > 0
    normalize_score_head(models.reward.head, shift=norm["shift"], scale=norm["scale"])
    again = public_reward_norm(models, EVAL_PROMPTS, cfg=cfg.ppo, seed=5, seeds=2, chunk_records=8)
    assert again["shift"] == pytest.approx(0.0, abs=1e-5) and again["scale"] == pytest.approx(1.0, rel=1e-4)

    summary = run(dirs, make_ctx(cfg, private=False, ledger=None), tmp_path / "out", use_ray=False)
    reported = summary["reward_normalization"]
    assert reported["mode"] == "public" and reported["samples"] == cfg.ppo.objective.reward_norm_seeds * len(
        EVAL_PROMPTS)
    raw = load_ppo_models(sft_dir=dirs["sft"], rm_dir=dirs["rm"], lora=cfg.ppo.lora, seed=SEED)
    seq = torch.tensor([[5, 6, 8, 9]])
    expected = (reward_scores(raw, seq, torch.ones_like(seq)) - reported["shift"]) / reported["scale"]
    normalize_score_head(raw.reward.head, shift=reported["shift"], scale=reported["scale"])
    assert torch.allclose(reward_scores(raw, seq, torch.ones_like(seq)), expected, atol=1e-5)

    ctx = make_ctx(cfg, private=False, ledger=None)
    ctx.eval_prompts = None
    with pytest.raises(ValueError, match="reward_normalization=public"):
        run(dirs, ctx, tmp_path / "refused", use_ray=False)


def test_rloo_scores_groups_of_one_users_samples_and_leaves_the_value_head(dirs, tmp_path, monkeypatch):
    """samples_per_prompt=2 with RLOO: every sampled record is generated twice, its two rollouts form one group of
    one user, the advantages are leave-one-out within it, the value head is frozen (not trained, not noised) while
    the LoRA moves, and the ledger is what G=1 would write (G changes compute, not sensitivity or q)."""
    from safetensors.torch import load_file

    import trainers.stages.ppo as ppo_stage
    from trainers.rlhf.models import build_actor

    seen = []
    real = ppo_stage.build_experience

    def recording(models, rollouts, user_index, **kw):
        exp = real(models, rollouts, user_index, **kw)
        seen.append((kw["group"].clone(), exp))
        return exp

    monkeypatch.setattr(ppo_stage, "build_experience", recording)
    cfg = make_cfg("ppo.samples_per_prompt=2", "ppo.objective.advantage_estimator=rloo")
    ledger = Ledger.open(tmp_path / "ledger.jsonl", run_id="rloo", target_epsilon=TARGET_EPS,
                         target_delta=TARGET_DELTA, composition="parallel")
    try:
        with recorded_samples() as samples:
            s = run(dirs, make_ctx(cfg, private=True, ledger=ledger), tmp_path / "out", use_ray=False)
    finally:
        ledger.close()
    assert s["status"] == "completed" and s["steps"] == 2
    events = [e for e in read_ledger(tmp_path / "ledger.jsonl").events if e.stage == "ppo"]
    assert [(e.step, e.repeats) for e in events] == [(0, 2), (1, 2)]
    assert_samples_follow_the_ledger(samples, events, seed=SEED, num_users=NUM_USERS)
    assert seen, "no iteration sampled a record"
    for group, exp in seen:
        ids, counts = torch.unique(group, return_counts=True)
        assert (counts == 2).all(), "each sampled record is rolled out samples_per_prompt times"
        for g in ids:
            rows = (group == g).nonzero().flatten()
            assert exp.user_index[rows].unique().numel() == 1
            a, b = exp.advantages[rows[0]], exp.advantages[rows[1]]
            ra, rb = exp.rewards[rows[0]].sum(), exp.rewards[rows[1]].sum()
            assert float(a[exp.action_mask[rows[0]].bool()][0]) == pytest.approx(float(ra - rb), abs=1e-5)
            assert float(b[exp.action_mask[rows[1]].bool()][0]) == pytest.approx(float(rb - ra), abs=1e-5)
    init = build_actor(sft_dir=dirs["sft"], lora=cfg.ppo.lora, seed=SEED)
    head = load_file(str(tmp_path / "out" / "value_head.safetensors"))
    assert torch.equal(head["weight"], init.head.weight.detach()), "the value head is frozen under RLOO"
    adapter = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "the policy's LoRA moved"
