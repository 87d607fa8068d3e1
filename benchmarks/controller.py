"""Learned controller vs fixed schedules: DP-SFT (or the DP reward model) on the embedded task at equal (epsilon, delta).

For each epsilon and seed, the same DP-SFT (LoRA on the embedded base model, Poisson-sampled users of D1, the real
DP engine and a write-ahead ledger with the RDP filter at one fixed order) runs with each clip/noise policy;
``--stage rm`` runs the DP reward model instead (LoRA + score head on the base model, users of D2, Bradley-Terry):
  fixed      DP-SGD, one threshold per module C/sqrt(K), sigma calibrated to spend epsilon in the planned steps
  per_layer  fixed thresholds split by public module size (trainers.engine.policy.group_thresholds)
  adaptive   Andrew et al. quantile tracking from noisy clip counts (their cost folded into the same sigma_eff)
  noise_schedule  fixed thresholds with a public geometric sigma schedule (--noise-ratio: last over first),
             calibrated to the constant schedule's RDP at the same order (equal epsilon)
  online     the learned controller, SB3 SAC learning inside the run (default schedule during warm-up), depth buckets
  online_module / online_lora_param   the same at granularity module (one threshold per adapted module) or
             lora_param (one per LoRA A and per LoRA B tensor; the engine clips per tensor)
  frozen     the learned controller pretrained on PUBLIC proxy fine-tuning (SB3 here, or --artifact PATH)
  finetune   the same pretrained controller as a warm start that keeps learning online in the run
  nonprivate the same LoRA, steps and sampled users with no clipping or noise (one run per seed serves every
             epsilon): the non-private headroom (base -> non-private perplexity) and the end of each method's gap
Domain: ``data.private_domain=clinical`` fine-tunes on pseudo-clinical notes the base model never saw (headroom);
the default review domain is the public corpus's own distribution (almost none).
Measured (lower is better; the JSON's ``metric``): held-out perplexity of the response tokens of TEST users'
demonstrations (a quarter of D1's users, never trained on), or for ``--stage rm`` the held-out Bradley-Terry loss
of the TEST users' labelled pairs (a quarter of D2's users; their pairwise accuracy beside it), every
``--eval-every`` steps. The controller's reward uses public validation text only (the task's validation_text:
the public corpus, or under the clinical domain notes by one-off public authors): the LM loss on it for SFT, the
Bradley-Terry loss on gold-labelled pairs of it for the reward model, as in ``dpalign run``;
final value; the first step at which each method's seed-mean curve reaches the best baseline's final
value; the controller's overhead (time in plan/observe, its validation evaluations
included) as a share of step time, and each method's step time over fixed DP-SGD's in the same run
(``step_time_vs_fixed``). Every run's ledger epsilon is reported and must be <= the target.

  .venv/bin/python benchmarks/controller.py --json                  # defaults: eps 1 and 4, 3 seeds
  .venv/bin/python benchmarks/controller.py --seeds 1 --steps 20    # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] != str(ROOT):  # first even when PYTHONPATH has it: this file's own directory would make
    sys.path.insert(0, str(ROOT))  # `import controller` find this script instead of the package

METHODS = ("nonprivate", "fixed", "per_layer", "adaptive", "noise_schedule", "online", "online_module",
           "online_lora_param", "frozen", "finetune")
GRANULARITY = {"online": "bucket", "frozen": "bucket", "finetune": "bucket", "online_module": "module",
               "online_lora_param": "lora_param"}
"""controller.granularity of each controller method; online_lora_param clips every LoRA A and B separately."""
BASELINES = ("fixed", "per_layer", "adaptive", "noise_schedule")


class TimedPolicy:
    """Wraps a policy and accumulates the seconds spent in plan/observe (the controller's overhead)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0

    def plan(self, step: int, groups: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.inner.plan(step, groups)
        finally:
            self.seconds += time.perf_counter() - t

    def observe(self, released: Any) -> None:
        t = time.perf_counter()
        try:
            self.inner.observe(released)
        finally:
            self.seconds += time.perf_counter() - t


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """The embedded task, base model, the stage's tokenized records (split by user into train and held-out test)
    and what each method needs: ``build`` (model, per-record loss, learning rate), ``heldout`` (the measured
    metric, lower is better, with the numbers reported beside it) and ``validation`` (the controller's PUBLIC
    reward objective)."""
    from launch.config import load_config
    from launch.schema import RunConfig
    from trainers.data.io import load_public
    from trainers.data.task import build_task
    from trainers.models.base import ensure_base_model, load_base_model

    cfg = load_config(RunConfig, args.config, args.overrides)
    task = build_task(cfg.data, cache_dir=cfg.run.cache_dir, progress=False)
    info = ensure_base_model(
        cfg.model,
        cfg.data,
        cache_dir=cfg.run.cache_dir,
        public_train=task.public_train,
        public_valid=task.public_valid,
        progress=False,
    )
    _, tokenizer = load_base_model(info.path)
    # PUBLIC text of the domain being fine-tuned (the task's validation_text, what the pipeline rewards the
    # controller on): review validation text would reward keeping the model a good review writer.
    public = list(load_public(task.validation_text).rows["text"])
    common = {"cfg": cfg, "base": info.path, "tokenizer": tokenizer}
    if args.stage == "rm":
        return {**common, **_prepare_rm(cfg, task, tokenizer, public)}
    return {**common, **_prepare_sft(cfg, task, tokenizer, public)}


def _split_users(user_ids: list[str]) -> tuple[list[int], list[int]]:
    """(train rows, test rows): the last quarter of the users (by sorted id) is a TEST set never trained on, used
    only for the benchmark's held-out metric (the stage's own distribution); the controller never sees it."""
    ids = sorted(set(user_ids))
    test_users = set(ids[len(ids) - max(1, len(ids) // 4) :])
    return ([i for i, u in enumerate(user_ids) if u not in test_users],
            [i for i, u in enumerate(user_ids) if u in test_users])


def _prepare_sft(cfg: Any, task: Any, tokenizer: Any, public: list[str]) -> dict[str, Any]:
    """DP-SFT on D1: LoRA on the base model, held-out perplexity of the test users' responses; the controller's
    reward is the LM loss on the run's public validation windows."""
    from trainers.data.io import load_sft
    from trainers.models.base import load_base_model, validation_windows
    from trainers.models.lora import add_lora
    from trainers.rlhf.sft import tokenize_sft_pairs
    from trainers.stages.context import public_lm_loss
    from trainers.stages.sft import sft_loss_fn

    rows = load_sft(task.sft).rows
    user_ids = list(rows["user_id"])
    train_rows, test_rows = _split_users(user_ids)

    def tok(idx: list[int]) -> dict[str, Any]:
        prompts, responses = list(rows["prompt"]), list(rows["response"])
        b = tokenize_sft_pairs(
            tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx], max_length=cfg.sft.max_len
        )
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "loss_mask": b.loss_mask}

    test_records = tok(test_rows)
    # the windows dpalign run gives the controller (eval.perplexity_records of them; the tiny config's 8 are the
    # first half of the 16 the benchmark used before, so its results stay comparable)
    reward_windows = validation_windows(tokenizer, public, model_cfg=cfg.model, count=cfg.eval.perplexity_records)

    def build(base: str) -> tuple[torch.nn.Module, Any, float]:
        model, _ = load_base_model(base)
        lora = cfg.sft.lora
        model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                         target_modules=tuple(lora.target_modules))
        return model, sft_loss_fn(model), cfg.sft.lr

    return _stage_prep(
        "sft", "heldout_ppl", user_ids, train_rows, tok, test_records, build,
        heldout=lambda model: (heldout_ppl(model, test_records), {}),
        validation=lambda model: public_lm_loss(model, reward_windows),
    )


def _stage_prep(stage: str, metric: str, user_ids: list[str], train_rows: list[int], tok: Any,
                test_records: dict[str, Any], build: Any, *, heldout: Any, validation: Any) -> dict[str, Any]:
    """What ``run_one`` reads of a stage (see :func:`prepare`); ``records`` are the training users' rows."""
    from trainers.stages.context import UserIndex

    return {
        "stage": stage, "metric": metric, "users": UserIndex.from_ids([user_ids[i] for i in train_rows]),
        "records": tok(train_rows), "test_records": test_records, "build": build, "heldout": heldout,
        "validation": validation,
    }


def _prepare_rm(cfg: Any, task: Any, tokenizer: Any, public: list[str]) -> dict[str, Any]:
    """The DP reward model on D2: a LoRA + score head on the BASE model (the pipeline starts from the DP-SFT
    model; the benchmark isolates this stage), Bradley-Terry per pair. Held-out metric: the mean Bradley-Terry loss
    of the test users' labelled pairs (lower is better), with their pairwise accuracy beside it; the controller's
    reward is the Bradley-Terry loss on PUBLIC gold-labelled pairs of the domain (as in the pipeline)."""
    from trainers.data.io import load_preferences
    from trainers.stages.rm import (
        bt_loss_fn,
        gold_pairs,
        public_bt_loss,
        reward_model,
        rm_texts,
        tokenize_texts,
    )

    rows = load_preferences(task.rm).rows
    user_ids = list(rows["user_id"])
    train_rows, test_rows = _split_users(user_ids)
    prompts, chosen, rejected = list(rows["prompt"]), list(rows["chosen"]), list(rows["rejected"])
    max_len = cfg.rm.max_len

    def tok(idx: list[int]) -> dict[str, Any]:
        p = [prompts[i] for i in idx]
        c_ids, c_mask = tokenize_texts(tokenizer, rm_texts(tokenizer, p, [chosen[i] for i in idx]), max_len=max_len)
        r_ids, r_mask = tokenize_texts(tokenizer, rm_texts(tokenizer, p, [rejected[i] for i in idx]), max_len=max_len)
        return {"c_ids": c_ids, "c_mask": c_mask, "r_ids": r_ids, "r_mask": r_mask}

    test_records = tok(test_rows)
    pairs = gold_pairs(public, count=cfg.rm.gold_pairs, seed=0)

    def build(base: str) -> tuple[torch.nn.Module, Any, float]:
        model, _ = reward_model(cfg.rm, base)  # the stage's own initialization
        return model, bt_loss_fn(model), cfg.rm.lr

    def heldout(model: torch.nn.Module) -> tuple[float, dict[str, float]]:
        loss, accuracy = heldout_bt(model, test_records)
        return loss, {"heldout_accuracy": accuracy}

    return _stage_prep(
        "rm", "heldout_bt_loss", user_ids, train_rows, tok, test_records, build, heldout=heldout,
        validation=lambda model: public_bt_loss(model, tokenizer, pairs, max_len=max_len),
    )


@torch.no_grad()
def heldout_bt(model: torch.nn.Module, recs: dict[str, Any], batch: int = 64) -> tuple[float, float]:
    """(mean Bradley-Terry loss, accuracy) of a reward model on held-out TEST users' labelled pairs."""
    from trainers.stages.rm import bt_loss_fn

    was = model.training
    model.eval()
    loss_fn = bt_loss_fn(model)
    losses = []
    for i in range(0, recs["c_ids"].shape[0], batch):
        losses.append(loss_fn({k: v[i : i + batch] for k, v in recs.items()}))
    model.train(was)
    per = torch.cat(losses)  # [R] softplus(s_r - s_c): below log 2 exactly when chosen scores higher
    return float(per.mean()), float((per < math.log(2.0)).float().mean())


@torch.no_grad()
def heldout_ppl(model: torch.nn.Module, recs: dict[str, Any], batch: int = 32) -> float:
    """Perplexity of the response tokens of held-out TEST users' demonstrations (never trained on)."""
    from trainers.rlhf.sft import causal_lm_loss_per_record

    was = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, recs["input_ids"].shape[0], batch):
        ids, am, lm = (recs[k][i : i + batch] for k in ("input_ids", "attention_mask", "loss_mask"))
        per = causal_lm_loss_per_record(model(input_ids=ids, attention_mask=am).logits, ids, lm)  # [b]
        n = lm[:, 1:].sum(1).clamp(min=1).float()  # [b] target tokens of each record
        total += float((per * n).sum())
        count += float(n.sum())
    model.train(was)
    return math.exp(total / max(count, 1.0))


def pretrain_frozen(args: argparse.Namespace, out: Path) -> str:
    from controller.artifact import Provenance
    from controller.config import ControllerConfig, ProxyEnvConfig
    from controller.env import ProxyDPEnv
    from controller.sb3 import train_sb3

    overrides = _controller_overrides(args)
    sac = {"learning_starts": 4, "batch_size": 32, "gradient_steps": 8,
           **_controller_overrides(args, items=args.pretrain_controller)}
    cfg = ControllerConfig(
        interval=args.interval,
        **sac,
        env=ProxyEnvConfig(
            steps=args.steps,
            interval=args.interval,
            target_epsilons=list(args.epsilons),
            **{k: v for k, v in overrides.items() if k in ("reward", "reward_scale", "privacy_penalty")},
        ),
        **{k: v for k, v in overrides.items()
           if k in ("clip_range", "noise_range", "buckets", "reward", "reward_scale", "privacy_penalty")
           and k not in sac},
    )
    env = ProxyDPEnv(cfg.env, cfg.spec())
    train_sb3(
        env,
        config=cfg,
        episodes=args.pretrain_episodes,
        provenance=Provenance(
            trainer="sb3",
            model_layers=[cfg.env.n_layer],
            model_width=cfg.env.n_embd,
            epsilons=list(args.epsilons),
            delta=cfg.env.delta,
            steps=cfg.env.steps,
            reward=cfg.env.reward,
        ),
        out=out,
    )
    return str(out)


def geometric_noise_schedule(guard: Any, *, ratio: float) -> list[float]:
    """sigma_t = sigma_0 * ratio ** (t / (T - 1)), public and fixed before the run (ratio < 1: less noise as
    training goes on), with sigma_0 the smallest that spends no more RDP at the guard's order than the constant
    schedule at the guard's reference sigma: the same (epsilon, delta) by construction; the ledger's filter checks."""
    from accounting.accountants import mechanism_rdp

    def rdp(sigma: float) -> float:  # one step at the guard's order (repeats 1: the benchmark reuses no sample)
        return mechanism_rdp(sampling_rate=guard.sampling_rate, composed_noise_multiplier=sigma, order=guard.rdp_order)

    steps = guard.steps
    shape = [ratio ** (t / max(steps - 1, 1)) for t in range(steps)]
    budget = steps * rdp(guard.sigma_reference)

    def spent(s0: float) -> float:
        return sum(rdp(s0 * f) for f in shape)

    lo, hi = 1e-3, 1e3
    for _ in range(200):  # bisection on sigma_0: spent() falls as sigma_0 grows
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if spent(mid) <= budget else (mid, hi)
    return [hi * f * (1 + 1e-9) for f in shape]


class ScheduledNoisePolicy:
    """DP-SGD with a public per-step noise multiplier ``sigmas[t]`` and one threshold for every group."""

    def __init__(self, *, sigmas: list[float], clip_norm: float) -> None:
        self.sigmas, self.clip_norm = sigmas, clip_norm

    def plan(self, step: int, groups: Any) -> Any:
        from trainers.engine.policy import StepPlan

        k = len(groups)
        std = self.sigmas[min(step, len(self.sigmas) - 1)] * self.clip_norm * math.sqrt(k)
        return StepPlan(clip_norms=(self.clip_norm,) * k, noise_stds=(std,) * k)

    def observe(self, released: Any) -> None:
        return None


def _controller_overrides(args: argparse.Namespace, items: list[str] | None = None) -> dict[str, Any]:
    """``--controller clip_range=2 noise_range=1.5`` (or the ``items`` given, e.g. ``--pretrain-controller``):
    ControllerConfig fields, typed like the field's default."""
    from controller.config import ControllerConfig

    defaults = ControllerConfig()
    out: dict[str, Any] = {}
    for item in args.controller if items is None else items:
        key, sep, value = item.partition("=")
        if not sep or not hasattr(defaults, key) or key in (
            "mode", "granularity", "load", "interval", "seed", "env", "hidden"
        ):
            raise SystemExit(f"--controller {item!r}: expected FIELD=VALUE with a ControllerConfig field "
                             "(mode, granularity, load, interval, seed, env and hidden are set by the benchmark)")
        out[key] = type(getattr(defaults, key))(value)
    return out


def _check_controller_overrides(args: argparse.Namespace) -> None:
    from controller.config import ControllerConfig
    from dpalign.config import ConfigError

    try:
        ControllerConfig(**_controller_overrides(args)).check()
        ControllerConfig(**_controller_overrides(args, items=args.pretrain_controller)).check()
    except ConfigError as err:
        raise SystemExit(f"--controller: {err}") from None


def run_one(
    prep: dict[str, Any],
    *,
    method: str,
    epsilon: float,
    seed: int,
    args: argparse.Namespace,
    artifact: str | None,
    workdir: Path,
) -> dict[str, Any]:
    from accounting.ledger import Ledger
    from controller.budget import BudgetGuard
    from controller.config import ControllerConfig
    from controller.policy import LearnedController
    from trainers.engine.engine import DPEngine, clipping_groups, trainable_named_parameters
    from trainers.engine.policy import AdaptiveClippingPolicy, FixedPolicy, GroupSpec, PerLayerFixedPolicy

    cfg, users, stage = prep["cfg"], prep["users"], prep["stage"]
    n = users.num_users
    q = min(1.0, args.batch_users / n)
    delta = 1.0 / n
    steps = args.steps
    torch.manual_seed(seed)
    model, loss_fn, lr = prep["build"](prep["base"])
    model.train()
    params = trainable_named_parameters(model)
    opt = torch.optim.Adam([p for _, p in params], lr=lr)
    if method == "nonprivate":  # no clipping, no noise, no ledger: the same loop on the mean loss
        def plain_step(batch: Any) -> None:
            if len(batch.user_ids):
                loss_fn(batch.records).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        curve, step_seconds, extra = _train_and_evaluate(prep, model, plain_step, q=q, seed=seed, args=args)
        return _result("nonprivate", epsilon, seed, 0.0, curve, step_seconds, steps, 0.0, 0.0, extra)
    grouping = "per_tensor" if GRANULARITY.get(method) == "lora_param" else "module"
    groups = [
        GroupSpec(
            name=g, numel=sum(params[i][1].numel() for i in idx), param_names=tuple(params[i][0] for i in idx)
        )
        for g, idx in clipping_groups(model, params, grouping)
    ]
    k = len(groups)
    # One RDP filter order and one calibrated sigma for every method: equal epsilon by construction.
    guard = BudgetGuard(target_epsilon=epsilon, delta=delta, sampling_rate=q, steps=steps)
    sigma, order = guard.sigma_reference, guard.rdp_order
    c = args.clip_norm
    if method == "fixed":
        policy: Any = FixedPolicy(noise_multiplier=sigma, clip_norm=c / math.sqrt(k))
    elif method == "noise_schedule":
        policy = ScheduledNoisePolicy(
            sigmas=geometric_noise_schedule(guard, ratio=args.noise_ratio), clip_norm=c / math.sqrt(k)
        )
    elif method == "per_layer":
        w = [math.sqrt(g.numel) for g in groups]
        norm = math.sqrt(sum(x * x for x in w))
        policy = PerLayerFixedPolicy(noise_multiplier=sigma, clip_norms=[c * x / norm for x in w])
    elif method == "adaptive":
        policy = AdaptiveClippingPolicy(
            noise_multiplier=sigma,
            initial_clip_norm=c / math.sqrt(k),
            count_noise_std=max(q * n / 20.0, math.sqrt(k) * sigma),
            target_quantile=0.5,
        )
    else:
        mode = method if method in ("frozen", "finetune") else "online"
        fields = {"learning_starts": 2, "batch_size": 16, "gradient_steps": 4, **_controller_overrides(args)}
        ccfg = ControllerConfig(
            mode=mode,
            granularity=GRANULARITY[method],
            load=artifact if mode != "online" else "",
            interval=args.interval,
            seed=seed,
            **fields,
        )
        policy = LearnedController(
            config=ccfg,
            target_epsilon=epsilon,
            delta=delta,
            sampling_rate=q,
            steps=steps,
            validation_loss=lambda: prep["validation"](model),
            rdp_order=order,
            stage=stage,
            reference_clips=[c / math.sqrt(k)] * k,
            group_names=[g.name for g in groups],
        )
    timed = TimedPolicy(policy)
    run_dir = workdir / f"{method}-{epsilon}-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(
        run_dir / "ledger.jsonl",
        run_id=run_dir.name,
        target_epsilon=epsilon,
        target_delta=delta,
        accountant="rdp",
        composition="parallel",
        rdp_order=order,
    )
    ledger.begin_stage(stage, user_fingerprint=users.fingerprint, num_users=n)
    engine = DPEngine(
        model,
        stage=stage,
        sampling_rate=q,
        num_users=n,
        seed=seed,
        policy=timed,
        event_sink=ledger.record,
        admit=ledger.admit,
        optimizer=opt,
        grouping=grouping,
        max_records_per_microbatch=cfg.engine.max_physical_batch_records,
    )

    def dp_step(batch: Any) -> None:
        engine.step(batch, loss_fn)
        opt.step()
        opt.zero_grad(set_to_none=True)

    curve, step_seconds, extra = _train_and_evaluate(prep, model, dp_step, q=q, seed=seed, args=args)
    engine.close()
    ledger.end_stage(stage)
    eps = ledger.epsilon(stage)
    ledger.close()
    extra["ledger_verified"] = verify_ledger(run_dir / "ledger.jsonl", stage=stage, epsilon=eps, steps=steps)
    return _result(method, epsilon, seed, eps, curve, step_seconds, steps, timed.seconds, sigma, extra)


def verify_ledger(path: Path, *, stage: str, epsilon: float, steps: int) -> bool:
    """The run's epsilon recomputed from its ledger file alone (a fresh read and a fresh accountant, as
    ``dpalign privacy verify`` does) equals what the run's ledger reported, over one event per planned step."""
    from accounting.ledger import compute_privacy, read_ledger

    recomputed = compute_privacy(read_ledger(path))["stages"][stage]
    return (
        math.isclose(recomputed["epsilon"], epsilon, rel_tol=1e-9)
        and recomputed["num_events"] == steps
        and recomputed["status"] == "completed"
    )


def _train_and_evaluate(
    prep: dict[str, Any], model: torch.nn.Module, step: Any, *, q: float, seed: int, args: argparse.Namespace
) -> tuple[list[tuple[int, float]], float, dict[str, float]]:
    """The loop every method shares: Poisson-sampled users (the same draws per seed for every method), one timed
    ``step(batch)`` each, the held-out metric every ``--eval-every`` steps and at the end. Returns the curve, the
    step seconds and what the last evaluation reported beside the metric."""
    from trainers.engine.engine import UserBatch
    from trainers.engine.sampling import PoissonUserSampler

    users, records = prep["users"], prep["records"]
    sampler = PoissonUserSampler(users.num_users, sampling_rate=q, seed=seed)
    value, extra = prep["heldout"](model)
    curve = [(0, value)]
    seconds = 0.0
    for t in range(args.steps):
        idx = users.records_of(sampler.sample(t))
        batch = UserBatch(records={kk: v[idx] for kk, v in records.items()}, user_ids=users.record_user[idx])
        start = time.perf_counter()
        step(batch)
        seconds += time.perf_counter() - start
        if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
            value, extra = prep["heldout"](model)
            curve.append((t + 1, value))
    return curve, seconds, extra


def _result(method: str, epsilon: float, seed: int, spent: float, curve: list, step_seconds: float, steps: int,
            policy_seconds: float, sigma: float, extra: dict[str, float]) -> dict[str, Any]:
    return {
        "method": method,
        "epsilon_target": epsilon,
        "seed": seed,
        "epsilon_spent": spent,
        "final": curve[-1][1],
        **extra,
        "curve": curve,
        "step_seconds": step_seconds,
        "steps": steps,
        "policy_seconds": policy_seconds,
        "sigma_reference": sigma,
    }


def summarize(runs: list[dict[str, Any]], epsilons: list[float]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for eps in epsilons:
        rows = {m: [r for r in runs if r["method"] == m and r["epsilon_target"] == eps] for m in METHODS}
        rows = {m: rs for m, rs in rows.items() if rs}
        means = {}
        for m, rs in rows.items():
            steps_axis = [s for s, _ in rs[0]["curve"]]
            mean_curve = [statistics.fmean(r["curve"][i][1] for r in rs) for i in range(len(steps_axis))]
            finals = [r["final"] for r in rs]
            means[m] = {
                "final": statistics.fmean(finals),
                "final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "curve_steps": steps_axis,
                "curve_values": mean_curve,
                **{k: statistics.fmean(r[k] for r in rs) for k in rs[0] if k.startswith("heldout_")},
                "overhead_share": statistics.fmean(
                    r["policy_seconds"] / max(r["step_seconds"], 1e-9) for r in rs
                ),
                "max_epsilon_spent": max(r["epsilon_spent"] for r in rs),
                "step_seconds": statistics.fmean(r["step_seconds"] / max(r["steps"], 1)
                                                 for r in rs),
            }
        base = statistics.fmean(r["curve"][0][1] for rs in rows.values() for r in rs)
        baselines = [m for m in BASELINES if m in means]
        best = min(baselines, key=lambda m: means[m]["final"]) if baselines else None
        for s in means.values():
            if best is not None:
                target = means[best]["final"]
                reached = [st for st, p in zip(s["curve_steps"], s["curve_values"], strict=True) if p <= target]
                s["steps_to_best_baseline"] = reached[0] if reached else None
                s["step_share_to_best_baseline"] = (reached[0] / s["curve_steps"][-1]) if reached else None
            if "fixed" in means:
                fixed_final = means["fixed"]["final"]
                reached = [st for st, p in zip(s["curve_steps"], s["curve_values"], strict=True) if p <= fixed_final]
                s["steps_to_fixed"] = reached[0] if reached else None
                s["step_share_to_fixed"] = (reached[0] / s["curve_steps"][-1]) if reached else None
                s["vs_fixed"] = s["final"] / means["fixed"]["final"]
                s["step_time_vs_fixed"] = s["step_seconds"] / max(means["fixed"]["step_seconds"], 1e-12)
            if "fixed" in means and "nonprivate" in means:
                gap = means["fixed"]["final"] - means["nonprivate"]["final"]
                s["gap_closed"] = (means["fixed"]["final"] - s["final"]) / gap if gap > 0 else None
        headroom = None
        if "nonprivate" in means:
            headroom = 1.0 - means["nonprivate"]["final"] / base
        table[str(eps)] = {"best_baseline": best, "base": base, "nonprivate_headroom": headroom,
                           "methods": means}
    return table


def _relative(path: str) -> str:
    """A config path as the JSON records it: relative to the repository when inside it (no machine paths)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "launch/configs/tiny.yaml"))
    parser.add_argument("overrides", nargs="*", default=["data.num_users=300"])
    parser.add_argument("--stage", choices=("sft", "rm"), default="sft",
                        help="sft: DP-SFT on D1, held-out perplexity; rm: the DP reward model on D2, held-out "
                             "Bradley-Terry loss and pairwise accuracy")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--batch-users", type=int, default=16)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--noise-ratio", type=float, default=0.5,
                        help="noise_schedule: last step's sigma over the first's (geometric in between)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--artifact", default="", help="pretrained controller for 'frozen' and 'finetune' (default: pretrain one)"
    )
    parser.add_argument("--pretrain-episodes", type=int, default=20)
    parser.add_argument("--controller", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="controller config fields for every controller method, e.g. clip_range=2 noise_range=1.5")
    parser.add_argument("--pretrain-controller", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="controller config fields of the SB3 pretraining only (frozen / finetune), e.g. "
                             "ent_coef=0.01 gradient_steps=8; they override --controller there")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    _check_controller_overrides(args)  # a mistyped --controller field fails before the task is built
    torch.set_num_threads(args.threads)
    t0 = time.time()
    prep = prepare(args)
    # the runs' directories (ledgers, checkpoints, the pretrained artifact) go when the benchmark ends
    with tempfile.TemporaryDirectory(prefix="dpalign-bench-controller-") as tmp:
        work = Path(tmp)
        artifact = args.artifact or None
        pretrain_s = 0.0
        if {"frozen", "finetune"} & set(args.methods) and artifact is None:
            t = time.time()
            artifact = pretrain_frozen(args, work / "artifact")
            pretrain_s = time.time() - t
        # One untimed fixed run first: the first run in a process pays one-off costs (allocator, kernels, lazy
        # imports) that would otherwise inflate whichever method is measured first (fixed, the baseline).
        warm = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 2), "eval_every": 1})
        run_one(prep, method="fixed", epsilon=args.epsilons[0], seed=0, args=warm, artifact=None, workdir=work / "warm")
        runs = []
        for eps in args.epsilons:
            for seed in range(args.seeds):
                for m in args.methods:
                    done = next((r for r in runs if m == "nonprivate" and r["method"] == m and r["seed"] == seed), None)
                    if done is not None:  # no noise, no epsilon: one run per seed serves every epsilon's row
                        runs.append({**done, "epsilon_target": eps})
                        continue
                    r = run_one(
                        prep, method=m, epsilon=eps, seed=seed, args=args, artifact=artifact, workdir=work
                    )
                    assert r["epsilon_spent"] <= eps, f"{m} overspent: {r['epsilon_spent']} > {eps}"
                    assert m == "nonprivate" or r["ledger_verified"], f"{m} eps={eps} seed={seed}: ledger does not verify"
                    runs.append(r)
                    if not args.json:
                        print(
                            f"eps={eps} seed={seed} {m:17s} final {r['final']:.4f} "
                            f"eps spent {r['epsilon_spent']:.3f} overhead {r['policy_seconds'] / r['step_seconds']:.3f}",
                            flush=True,
                        )
    out = {
        "settings": {k: (_relative(v) if k == "config" else v) for k, v in vars(args).items() if k != "json"},
        "stage": prep["stage"],
        "metric": prep["metric"],
        "num_users": prep["users"].num_users,
        "pretrain_seconds": pretrain_s,
        "total_seconds": time.time() - t0,
        "table": summarize(runs, args.epsilons),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for eps, t in out["table"].items():
            headroom = t["nonprivate_headroom"]
            print(f"\n== epsilon {eps}: best baseline {t['best_baseline']}, base {t['base']:.4f}"
                  + (f", non-private headroom {headroom:.1%}" if headroom is not None else ""))
            for m, s in t["methods"].items():
                print(
                    f"  {m:17s} final {s['final']:.4f}±{s['final_sd']:.4f}  vs fixed {s.get('vs_fixed', float('nan')):.3f}"
                    f"  steps to best baseline {s.get('steps_to_best_baseline')}  overhead {s['overhead_share']:.3f}"
                    f"  step time vs fixed {s.get('step_time_vs_fixed', float('nan')):.3f}"
                    f"  gap closed {s.get('gap_closed')}  steps to fixed {s.get('steps_to_fixed')}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
