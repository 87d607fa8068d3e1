"""DP-PPO on D3 (Wu et al. 2023, stage 3): the recipe, top to bottom.

    users = UserIndex(D3)                                      # the privacy unit
    plan = ctx.plan                                            # q, T, K, sigma: frozen before any step
    for t in range(T):
        sample users (Poisson, rate q) -> their prompts -> rollouts (Ray actors or in process, same seeds)
        score: private RM on the last token (post-processing), reference log-probs, values
        Experience: r_t = -beta * KL_t (+ score on the last token), GAE per trajectory, user-safe normalization
        for k in range(K): engine.step(UserBatch(exp, exp.user_index), loss_fn, repeats=K, release=k); opt.step()
        sync ONLY the LoRA weights to the rollout actors
        public evaluation on public prompts: reward, KL, gold reward, policy-change clip fraction (free)

This file is the recipe alone. Its components are in ``trainers/rlhf/``: ``models`` (actor-critic, reference,
reward model), ``rollout_batch`` (rollouts -> scores -> experience -> the per-record PPO loss), ``public_eval``
(public-prompt statistics and the public reward normalization); the step loop's admission and refusal are the
shared ``trainers.stages.learner.admitted_step``.

Privacy decisions, and why:
  * One Poisson sample per iteration, reused for K epochs: ONE PrivacyEvent with repeats=K (multiplier
    sigma_eff / sqrt(K)), emitted by the engine before the first release. Counting the epochs as fresh steps would
    understate epsilon badly (docs/design.md section 2, "Reuse of a sample").
  * minibatches > 1 is refused (before anything is spent). Disjoint user minibatches within an epoch would be
    sound with the SAME event (each user is in one release per epoch, so K releases per iteration) if the
    partition were a public function of the user id and each minibatch were normalized by the public B / M. The
    engine's event model cannot express it: every release of a step must be over the same records, normalized by
    q * N. See ``check_supported``.
  * The loss is per record: the clipped surrogate and the value loss are means over the record's own actions,
    advantages are normalized per trajectory or by a public constant (batch whitening is refused at config load).
  * ``ppo.samples_per_prompt`` = G rollouts of each sampled record, all the record's user's: the per-user
    gradient sums them before clipping, so G changes compute, not sensitivity. Their RLOO baseline
    (``objective.advantage_estimator=rloo``) is the mean return of the record's other samples: one user's data.
  * The reward model's scores and the reference's log-probs are post-processing of DP (or public) models.
  * beta is fixed, or adapted from the KL measured on PUBLIC prompts only; never from the private batch.
  * Every logged number is public: epsilon and sigma_eff (ledger), and statistics of generations on a fixed set
    of public evaluation prompts (reward, KL to the reference, gold reward, and ``ppo/clipfrac``: the fraction of
    public-rollout tokens whose probability ratio new/old left [1 - clip_eps, 1 + clip_eps] over the iteration).
    The clip fraction of the PRIVATE batch would need its own noisy release; we chose the public one instead.
  * Throughput (``perf/steps_per_sec``) is a wall-clock timing and therefore depends on the realized (private)
    batch size: it is logged only when the stage is not private.

Where it runs: ``run_ppo`` is the driver side (data, users, schedule, sigma, the ledger's stage header) and
``learn_ppo`` the learner, in this process or on ``ray.num_workers`` Ray Train workers (``run_stage_learner``, as
SFT and the reward model). Rank 0 drives the rollouts and broadcasts them with the iteration's beta; each rank
scores its shard of the sampled users against its own policy/reference/reward copies; the engine all-reduces the
clipped sums before the one noise draw, so N workers give the single-process update (tested: 2 gloo workers
within 1e-5). Rank 0 alone syncs the LoRA weights to the actors, evaluates on public prompts and adapts beta;
its privacy filter's answer reaches the other ranks before the step's all-reduce, so a refused step stops every
rank cleanly. DeepSpeed ZeRO-3 is refused (rank 0 generates alone); every rank loads the SFT model twice and
the reward model once.

Determinism: the sample of iteration t, the rollout seeds and the noise depend only on (seed, t); rollouts by N
Ray actors equal in-process generation (``trainers.rollout``). The actor runs in eval mode throughout (gradients
still flow): dropout would make per-user gradients random and the PPO ratio differ from 1 at the first epoch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainers.rlhf.heads import (
    PolicyValueModel,
)
from trainers.rlhf.models import PPOModels, build_actor, check_model_dirs, load_ppo_models
from trainers.rlhf.public_eval import (
    PublicEval,
    normalize_score_head,
    policy_change,
    public_eval,
    public_reward_norm,
)
from trainers.rlhf.rollout_batch import build_experience, pad_rollouts, ppo_loss_fn
from trainers.stages.context import (
    StageContext,
    UserIndex,
    noise_disclosure,
    progress_bar,
    public_lm_loss,
    released_wall_time,
    save_json,
)
from trainers.stages.learner import (
    Learner,
    admitted_step,
    build_engine,
    learner_state,
    make_learner_optimizer,
    restore_policy,
    resume_point,
    save_outputs,
    share_admission,
    stage_noise_seed,
)
from trainers.stages.plan import stage_plan
from trainers.stages.ray_learner import check_distributable, run_stage_learner
from trainers.stages.summary import summarize

STAGE = "ppo"


PUBLIC_EVAL_PROMPTS = 16
"""Public prompts generated from the policy after every iteration for the logged reward/KL/gold reward."""


class UnsupportedPPOConfig(ValueError):
    """A PPO setting the recipe cannot run with correct accounting; raised before any privacy is spent."""


class _Rollouts:
    """Generation of the sampled prompts: N Ray actors (LoRA-only sync) or the learner's own model, same seeds."""

    def __init__(self, models: PPOModels, *, sft_dir: Path, cfg: Any, use_ray: bool, ray_cfg: Any = None) -> None:
        self.models = models
        self.cfg = cfg
        self.group = None
        self._started_ray = False
        if use_ray and cfg.rollout_actors >= 1:
            from cluster.runtime import init_ray
            from trainers.rollout import RolloutGroup

            # The pipeline has normally started (or joined) Ray already, from cfg.ray: then this is a no-op. Used
            # alone (tests, a recipe called directly) it starts or joins Ray with the same ray.address/num_cpus.
            self._started_ray = init_ray(
                address=getattr(ray_cfg, "address", "") or None, num_cpus=getattr(ray_cfg, "num_cpus", 0) or None,
                log_to_driver=False,
            ).started_here
            self.group = RolloutGroup(sft_dir, lora=cfg.lora, num_actors=cfg.rollout_actors,
                                      threads=cfg.rollout_cpus_per_actor)

    def generate(self, prompts: Sequence[str], *, seed: int) -> list[Any]:
        from trainers.rollout import generate_rollouts

        kwargs = dict(
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            top_k=self.cfg.top_k,
            seed=seed,
            batch_size=self.cfg.rollout_batch_size,
        )
        if self.group is not None:
            return self.group.generate(prompts, **kwargs)
        return generate_rollouts(self.models.policy, self.models.tokenizer, list(prompts), **kwargs)

    def sync(self) -> tuple[int, float] | None:
        """Send the policy's LoRA tensors (not the value head, not the base) to the actors; (bytes, seconds)."""
        if self.group is None:
            return None
        from trainers.rollout import lora_state_dict

        stats = self.group.sync_lora(lora_state_dict(self.models.policy))
        return stats.bytes, stats.seconds

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        if self._started_ray:  # only the Ray this object started
            from cluster.runtime import shutdown_ray

            shutdown_ray()
            self._started_ray = False


def check_supported(cfg: Any) -> None:
    """Refuse, before any privacy is spent, PPO settings whose accounting the engine cannot express.

    Raises:
        UnsupportedPPOConfig: ``ppo.minibatches > 1``.
    """
    if cfg.ppo.minibatches != 1:
        raise UnsupportedPPOConfig(
            f"ppo.minibatches={cfg.ppo.minibatches}: not supported; set ppo.minibatches=1. Disjoint user "
            "minibatches would cost the same event as one update per epoch only if each user were in exactly one "
            "minibatch (partition by a public hash of the user id) and each minibatch update were normalized by "
            "the public q*N/minibatches; the DP engine's releases must all be over the same sample normalized by "
            "q*N, so the recipe cannot account minibatches correctly. Use ppo.ppo_epochs for more updates per "
            "sample (accounted as repeats of one sample)"
        )


def rollout_seed(seed: int, iteration: int) -> int:
    """Seed of iteration t's rollouts (generate micro-batch i uses this + i): distinct per (stage seed, t)."""
    from trainers.engine.sampling import step_seed

    return step_seed(seed, iteration, "ppo/rollout") % (1 << 31)


def check_distributed(ctx: StageContext, *, use_ray: bool) -> None:
    """Refuse, before any privacy is spent, what the PPO learner cannot run on Ray Train workers.

    Raises:
        ValueError: ``deepspeed.zero_stage=3`` (rank 0 generates alone, which partitioned weights cannot do), or
            rollout actors that do not fit in the Ray cluster next to the learners (they would wait forever).
    """
    check_distributable(ctx)
    cfg = ctx.cfg
    if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:
        raise ValueError(
            "deepspeed.zero_stage=3 with the PPO learner on Ray Train workers: rank 0 generates alone (the public "
            "evaluation every iteration, and the rollouts when ppo.rollout_actors=0), and ZeRO-3 partitions the "
            "policy's weights so a forward needs every rank; use deepspeed.zero_stage=2 (or lower) or "
            "deepspeed.enabled=false"
        )
    if not rollout_used_ray(use_ray, cfg.ppo):
        return
    import ray

    if not ray.is_initialized():
        return  # run_stage_learner says that Ray must be up
    have = float(ray.cluster_resources().get("CPU", 0.0))
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker + cfg.ppo.rollout_actors * cfg.ppo.rollout_cpus_per_actor
    if need > have:
        raise ValueError(
            f"ppo.rollout_actors={cfg.ppo.rollout_actors} (ppo.rollout_cpus_per_actor="
            f"{cfg.ppo.rollout_cpus_per_actor}) next to ray.num_workers={cfg.ray.num_workers} learners "
            f"(ray.cpus_per_worker={cfg.ray.cpus_per_worker}) need {need:g} CPUs and the Ray cluster has {have:g}: "
            "the actors would never start. Raise ray.num_cpus (embedded Ray), lower ray.cpus_per_worker or "
            "ppo.rollout_actors, or set ppo.rollout_actors=0 (rank 0 generates in its own process)"
        )


@dataclass(frozen=True)
class PPOPlan:
    """Everything a PPO learner rank needs, fixed by the driver before any step (plain, picklable data).

    Attributes:
        sft_dir: the SFT stage's merged export (policy base and reference); rm_dir: the reward-model stage's output
            (on a cluster, storage every worker can read).
        prompts: D3's prompt of every record; users: the privacy units (record -> user index).
        q, iterations: the public schedule (K = ``ppo.ppo_epochs`` repeats per iteration); sigma: the calibrated
            multiplier (None: non-private).
        eval_prompts: PUBLIC prompts generated after every iteration (rank 0); public_windows: PUBLIC token windows.
        norm_prompts: PUBLIC prompts the reward normalization is measured on (``reward_normalization=public``).
        use_ray: rollouts by ``ppo.rollout_actors`` Ray actors (started by rank 0) instead of rank 0's own model.
    """

    sft_dir: str
    rm_dir: str
    prompts: list[str]
    users: UserIndex
    q: float
    iterations: int
    sigma: float | None
    eval_prompts: list[str]
    norm_prompts: list[str]
    public_windows: Tensor | None
    use_ray: bool


def run_ppo(
    ctx: StageContext,
    *,
    sft_dir: Path,
    rm_dir: Path,
    prompts_path: str,
    out_dir: Path,
    public_windows: Tensor | None = None,
    eval_prompts: Sequence[str] | None = None,
    use_ray: bool = True,
) -> dict[str, Any]:
    """Run DP-PPO (or its non-private baseline) and save the policy; returns a plain-data summary.

    Driver side: data, users, schedule, sigma and the ledger's stage header; the training itself is
    :func:`learn_ppo`, run here or on ``ray.num_workers`` Ray Train workers (``ctx.distributed``) with the same
    result.

    Args:
        ctx: the stage context (``ctx.stage == "ppo"``); private stages need ``ctx.ledger`` and the target.
        sft_dir: the SFT stage's merged export (HF causal LM + tokenizer): the policy's base and the reference.
        rm_dir: the reward-model stage's output: ``backbone/`` (merged HF causal LM) and ``head.safetensors``.
        prompts_path: D3 (user_id, prompt), JSONL or Parquet.
        out_dir: receives ``adapter/`` (peft), ``value_head.safetensors``, ``model/`` (merged HF export) and
            ``summary.json``.
        public_windows: optional PUBLIC token windows [W, L]; their LM loss is logged as ``eval/public_lm_loss``.
        eval_prompts: PUBLIC held-out prompts; the first ``PUBLIC_EVAL_PROMPTS`` are generated from the policy
            after every iteration for ``ppo/reward``, ``ppo/kl``, ``ppo/clipfrac`` and ``eval/gold_reward``.
            Default ``ctx.eval_prompts``; without any, nothing is evaluated (and an adaptive beta,
            which must be fed a public KL, is refused).
        use_ray: generate rollouts with ``ppo.rollout_actors`` Ray actors (LoRA-only sync after each iteration);
            False generates in process with the same seeds and the same results.

    Returns:
        iterations, q, sigma, K, N, epsilon, beta, final public reward/KL/gold reward, sync bytes/seconds, wall
        seconds and status ("completed" or "refused" with a reason).

    Raises:
        UnsupportedPPOConfig: ppo.minibatches > 1 (before anything is spent).
        ValueError: a private stage without ledger or target; adaptive beta without public eval prompts; on Ray
            Train workers, what :func:`check_distributed` refuses.
    """
    from trainers.data.io import load_prompts

    cfg = ctx.cfg
    pcfg, objective = cfg.ppo, cfg.ppo.objective
    if ctx.stage != STAGE:
        raise ValueError(f"run_ppo needs a context for stage {STAGE!r}, got {ctx.stage!r}")
    check_supported(cfg)
    if eval_prompts is None:
        eval_prompts = ctx.eval_prompts
    norm_prompts = list(eval_prompts or [])
    eval_prompts = norm_prompts[:PUBLIC_EVAL_PROMPTS]
    if objective.reward_normalization == "public" and len(norm_prompts) < 2:
        raise ValueError(
            "ppo.objective.reward_normalization=public measures the reward model's scale on PUBLIC prompts; pass "
            "at least 2 eval_prompts (eval.prompts), or set reward_normalization=none"
        )
    if objective.kl_controller == "adaptive" and not eval_prompts:
        raise ValueError(
            "ppo.objective.kl_controller=adaptive needs a released or public KL; pass public eval_prompts (the "
            "recipe adapts beta from the KL on them), or use kl_controller=fixed"
        )
    if ctx.private and (ctx.ledger is None or (ctx.plan is None and None in (ctx.target_epsilon, ctx.target_delta))):
        raise ValueError("stage 'ppo' is private: the context needs the ledger and the target (epsilon, delta)")
    check_model_dirs(sft_dir=Path(sft_dir), rm_dir=Path(rm_dir))
    if ctx.distributed:
        check_distributed(ctx, use_ray=use_ray)

    start = time.time()
    data = load_prompts(prompts_path)
    users = UserIndex.from_ids(list(data.rows["user_id"]))
    N, T, K = users.num_users, pcfg.iterations, pcfg.ppo_epochs
    q = pcfg.sampling_rate(N)
    stage = stage_plan(ctx, num_users=N, sampling_rate=q, steps=T, repeats=K)  # frozen before any step
    sigma = stage.noise_multiplier
    if ctx.private:
        ctx.ledger.begin_stage(
            STAGE, user_fingerprint=users.fingerprint, num_users=N, target_epsilon=stage.target_epsilon,
            target_delta=stage.delta,
        )
    plan = PPOPlan(
        sft_dir=str(sft_dir), rm_dir=str(rm_dir), prompts=list(data.rows["prompt"]), users=users, q=q, iterations=T,
        sigma=sigma, eval_prompts=eval_prompts, norm_prompts=norm_prompts, public_windows=public_windows,
        use_ray=use_ray,
    )
    out_dir = Path(out_dir)
    result = run_stage_learner(ctx, learn_ppo, plan, fingerprint=users.fingerprint, out_dir=out_dir)
    if ctx.private:
        ctx.ledger.end_stage(STAGE, status=result["status"], reason=result["reason"])

    history = result["history"]
    final = history[-1] if history else {}
    learned = {k: v for k, v in result.items()
               if k not in ("iterations_done", "sigma_eff", "sync", "reward_norm", "history")}
    summary = summarize(
        ctx, learned, steps=result["iterations_done"], planned_steps=T, noise_multiplier=sigma,
        wall_time_s=released_wall_time(ctx, start),
        last_event_noise_multiplier=result["sigma_eff"],  # the controller may move it; fixed policies: = sigma
        num_users=N, sampling_rate=q, expected_users_per_iteration=q * N, ppo_epochs=K,
        target_epsilon=stage.target_epsilon, target_delta=stage.delta, kl_controller=objective.kl_controller,
        advantage_normalization=objective.advantage_normalization,
        reward_normalization={"mode": objective.reward_normalization, **(result.get("reward_norm") or {})},
        clipfrac_source="public eval prompts (policy change over each iteration)",
        public_eval_prompts=len(eval_prompts), final_reward=final.get("reward"), final_kl=final.get("kl"),
        final_gold_reward=final.get("gold_reward"), history=history,
        rollout={"ray_actors": pcfg.rollout_actors if rollout_used_ray(use_ray, pcfg) else 0, **result["sync"]},
        learner_workers=cfg.ray.num_workers if ctx.distributed else 0,
        noise=noise_disclosure(ctx.cfg, private=ctx.private),
    )
    save_json(out_dir / "summary.json", summary.to_dict())
    return summary


def learn_ppo(ctx: StageContext, plan: PPOPlan, learner: Learner) -> dict[str, Any]:
    """One learner rank of DP-PPO (every rank runs this; rank 0 drives the rollouts, evaluates, logs and saves).

    Per iteration t: every rank draws the same Poisson sample; rank 0 generates the sampled records' rollouts (Ray
    actors or its own model, seed ``rollout_seed(seed, t)``) and broadcasts them with the iteration's beta; each
    rank scores ITS shard of the users (``shard_users``) against its own policy/reference/reward copies and takes
    the K releases, whose clipped sums the engine all-reduces before the one noise draw; rank 0 then syncs the
    LoRA tensors to the actors and evaluates on public prompts (which steers an adaptive beta). Returns rank 0's
    results (other ranks return the same keys with their local, unused values).
    """
    from accounting.ledger import BudgetExceededError
    from trainers.distributed import broadcast_object, object_group
    from trainers.engine.sampling import PoissonUserSampler

    pcfg, objective = ctx.cfg.ppo, ctx.cfg.ppo.objective
    T, K, users = plan.iterations, pcfg.ppo_epochs, plan.users
    main, many = learner.is_main_process, learner.world_size > 1
    chunk = ctx.cfg.engine.max_physical_batch_records

    models = load_ppo_models(sft_dir=Path(plan.sft_dir), rm_dir=Path(plan.rm_dir), lora=pcfg.lora, seed=ctx.seed)
    models = models.to(learner.device)
    if not objective.critic:  # RLOO: no value loss, so the head would only take a share of the clip and noise
        models.actor.head.requires_grad_(False)
    ds_engine, optimizer, apply_fn, restored_step = make_learner_optimizer(
        learner, models.actor, lambda ps: torch.optim.Adam(ps, lr=pcfg.lr)
    )
    models.actor.eval()  # DeepSpeed's wrap may switch the module to train mode; PPO needs no dropout
    restored = learner.restored or {}
    # A crashed attempt: restart after the last iteration on the ledger, never before (see resume_step).
    start, lost = resume_point(ctx, learner, restored_step=restored_step)
    kl_ctl = objective.build_kl_controller()
    if restored:
        kl_ctl.load_state_dict(restored["kl_controller"])
    history: list[dict[str, float]] = list(restored.get("history", []))
    sync = dict(restored.get("sync", {"sync_count": 0, "sync_bytes": 0, "sync_seconds": 0.0}))
    sigma_eff: float | None = restored.get("sigma_eff")
    eval_prompts = plan.eval_prompts if main else []
    windows = plan.public_windows.to(learner.device) if plan.public_windows is not None and main else None
    eval_seed = rollout_seed(ctx.seed, 1 << 20)  # one fixed public-eval seed for every iteration

    def validation_objective() -> float:
        """The learned controller's objective on PUBLIC prompts (free to observe): softplus(-(RM reward - beta*KL)),
        a positive loss that falls as the KL-regularized reward rises (the controller normalizes by its start)."""
        ev = public_eval(models, eval_prompts, cfg=pcfg, seed=eval_seed, chunk_records=chunk)
        return float(torch.nn.functional.softplus(torch.tensor(-(ev.reward - kl_ctl.value * ev.kl))))

    group = object_group() if many else None
    reward_norm = restored.get("reward_norm")  # a restart keeps the constants of the first attempt
    if reward_norm is None and objective.reward_normalization == "public":
        reward_norm = public_reward_norm(
            models, plan.norm_prompts, cfg=pcfg, seed=rollout_seed(ctx.seed, 1 << 21),
            seeds=objective.reward_norm_seeds, chunk_records=chunk,
        ) if main else None
        if many:
            reward_norm = broadcast_object(reward_norm, group=group)
    if reward_norm is not None:
        normalize_score_head(models.reward.head, shift=reward_norm["shift"], scale=reward_norm["scale"])
    noise = stage_noise_seed(ctx, learner)  # secret (collective: rank 0 draws, every rank receives)
    engine = build_engine(
        ctx, models.actor, q=plan.q, users=users, noise_seed=noise, optimizer=optimizer, sigma=plan.sigma, steps=T,
        repeats=K, start_step=start, validation_loss=validation_objective if eval_prompts else None,
        learner=learner, apply_fn=apply_fn,
    )
    gate = share_admission(ctx, learner, engine)  # rank 0's filter answer reaches every rank before the all-reduce
    restore_policy(engine, restored)
    sampler = PoissonUserSampler(users.num_users, sampling_rate=plan.q, seed=noise)
    loss_fn = ppo_loss_fn(models.actor, objective)

    def state(done: int) -> dict[str, Any]:
        return learner_state(
            models.actor, optimizer, ds_engine, engine, next_step=done, kl_controller=kl_ctl.state_dict(),
            history=list(history), sync=dict(sync), sigma_eff=sigma_eff, steps_lost_in_crash=lost,
            reward_norm=reward_norm,
        )

    def add_sync(stats: tuple[int, float] | None, *, step: int | None) -> None:
        if stats is None:
            return
        sync["sync_count"] += 1
        sync["sync_bytes"] += stats[0]
        sync["sync_seconds"] += stats[1]
        if step is not None:
            ctx.log("rollout/sync_bytes", stats[0], step=step)
            ctx.log("rollout/sync_seconds", stats[1], step=step)

    rollout = (_Rollouts(models, sft_dir=Path(plan.sft_dir), cfg=pcfg, use_ray=plan.use_ray, ray_cfg=ctx.cfg.ray)
               if main else None)
    status, reason, done = "completed", "", start
    evaluation: PublicEval | None = None
    bar = progress_bar(ctx, T, "ppo")
    bar.update(start)
    try:
        if rollout is not None:
            # The actors' fresh adapter has its own random A (or this is a restart): make it the learner's.
            add_sync(rollout.sync(), step=None)
        if eval_prompts:
            evaluation = public_eval(models, eval_prompts, cfg=pcfg, seed=eval_seed, chunk_records=chunk)
            if start == 0:
                _log_eval(ctx, evaluation, step=0)
                history.append({"iteration": 0, "reward": evaluation.reward, "kl": evaluation.kl,
                                "gold_reward": evaluation.gold_reward})
        if windows is not None and start == 0:
            ctx.log("eval/public_lm_loss", public_lm_loss(models.policy, windows), step=0)
        for t in range(start, T):
            t0 = time.perf_counter()
            sampled = sampler.sample(t)  # [n] user indices (private: never logged), the same on every rank
            # [R * G] record index of every rollout: each sampled user's records, each G times (in a row)
            records = users.records_of(sampled).repeat_interleave(pcfg.samples_per_prompt)
            payload = None
            if rollout is not None:
                gen = (
                    rollout.generate([plan.prompts[i] for i in records.tolist()], seed=rollout_seed(ctx.seed, t))
                    if records.numel() > 0 else []
                )
                payload = (kl_ctl.value, gen)
            beta, gen = broadcast_object(payload, group=group) if many else payload
            batch = shard_batch(
                models, gen, sampled=sampled, records=records, users=users, rank=learner.rank,
                world_size=learner.world_size, beta=beta, objective=objective, chunk_records=chunk,
            )
            try:  # K epochs over the one sample: one event (repeats=K), fresh noise per release
                result = admitted_step(ctx, gate, engine, optimizer, batch, loss_fn, step=t, repeats=K)
                if result.event is not None:
                    sigma_eff = result.event.noise_multiplier
            except BudgetExceededError as err:
                status, reason = "refused", str(err)
                break
            done = t + 1
            if main:
                row = _after_iteration(
                    ctx, learner, models, rollout, evaluation, add_sync, plan=plan, done=done, beta=beta,
                    sigma_eff=sigma_eff, windows=windows, eval_seed=eval_seed, kl_ctl=kl_ctl, t0=t0,
                )
                evaluation = row.pop("_evaluation")
                history.append(row)
                bar.set_postfix(
                    {k: f"{row[k]:.3g}" for k in ("reward", "kl", "gold_reward", "epsilon") if k in row},
                    refresh=False,
                )
            learner.checkpoint(lambda d=done: state(d), step=done)
            bar.update(1)
    finally:
        bar.close()
        if rollout is not None:
            rollout.shutdown()
        engine.close()  # remove the per-user hooks before the model is copied for export
    save_outputs(learner, models.actor, ds_engine, models.tokenizer, exporter=_export_ppo,
                 init=lambda: build_actor(sft_dir=Path(plan.sft_dir), lora=pcfg.lora, seed=ctx.seed))
    return {
        "status": status,
        "reason": reason,
        "iterations_done": done,
        "sigma_eff": sigma_eff,
        "beta_final": kl_ctl.value,
        "history": history,
        "sync": sync,
        "resumed_at_step": start,
        "steps_lost_in_crash": lost,
        "reward_norm": reward_norm,
        "mechanism": engine.mechanism(),
    }


def shard_batch(
    models: PPOModels,
    gen: Sequence[Any],
    *,
    sampled: Tensor,
    records: Tensor,
    users: UserIndex,
    rank: int,
    world_size: int,
    beta: float,
    objective: Any,
    chunk_records: int,
) -> Any:
    """This rank's part of the iteration's sample as a ``UserBatch`` of Experience (empty: a noise-only share).

    All rollouts are padded together first, so every rank sees the widths of the single-process run; then only the
    rows of this rank's users (``shard_users``) are scored. ``gen[i]`` is the rollout of record ``records[i]``; a
    record appears ``ppo.samples_per_prompt`` times, and its rollouts form one RLOO group (one user's).
    """
    from trainers.distributed import shard_users
    from trainers.engine.engine import UserBatch

    if records.numel() == 0:
        return UserBatch.empty()
    if len(gen) != records.numel():
        raise ValueError(f"{len(gen)} rollouts for {records.numel()} sampled records; rank 0 sent another sample")
    tok = models.tokenizer
    padded = pad_rollouts(gen, pad_id=int(tok.pad_token_id), eos_id=int(tok.eos_token_id))
    mine = users.records_of(shard_users(sampled, rank=rank, world_size=world_size))
    rows = torch.nonzero(torch.isin(records, mine)).flatten()  # [M] positions of this rank's records
    if rows.numel() == 0:
        return UserBatch.empty()
    if rows.numel() < records.numel():
        padded = padded.select(rows)
    exp = build_experience(
        models, padded.to(models.device), users.record_user[records[rows]], beta=beta, objective=objective,
        chunk_records=chunk_records, group=records[rows],
    )
    return UserBatch(records=exp, user_ids=exp.user_index)


def _after_iteration(
    ctx: StageContext,
    learner: Learner,
    models: PPOModels,
    rollout: _Rollouts,
    evaluation: PublicEval | None,
    add_sync: Any,
    *,
    plan: PPOPlan,
    done: int,
    beta: float,
    sigma_eff: float | None,
    windows: Tensor | None,
    eval_seed: int,
    kl_ctl: Any,
    t0: float,
) -> dict[str, Any]:
    """Rank 0 after iteration ``done``: LoRA sync, public evaluation (feeds an adaptive beta), logs; the history
    row, with the new evaluation under ``_evaluation``."""
    pcfg, objective = ctx.cfg.ppo, ctx.cfg.ppo.objective
    chunk = ctx.cfg.engine.max_physical_batch_records
    add_sync(rollout.sync(), step=done)
    row: dict[str, Any] = {"iteration": done, "beta": beta}
    if evaluation is not None:
        clipfrac, approx_kl = policy_change(models, evaluation, clip_eps=objective.clip_eps, chunk_records=chunk)
        evaluation = public_eval(models, plan.eval_prompts, cfg=pcfg, seed=eval_seed, chunk_records=chunk)
        _log_eval(ctx, evaluation, step=done)
        ctx.log("ppo/clipfrac", clipfrac, step=done)
        ctx.log("ppo/approx_kl", approx_kl, step=done)
        kl_ctl.update(evaluation.kl, n_steps=pcfg.expected_users_per_iteration)  # public KL only
        row.update(reward=evaluation.reward, kl=evaluation.kl, gold_reward=evaluation.gold_reward,
                   clipfrac=clipfrac)
    if windows is not None:
        ctx.log("eval/public_lm_loss", public_lm_loss(models.policy, windows), step=done)
    eps = learner.epsilon() if ctx.private else 0.0
    if ctx.private:
        ctx.log("privacy/epsilon", eps, step=done)
        if sigma_eff is not None:
            ctx.log("privacy/sigma_eff", sigma_eff, step=done)
    ctx.log("charts/beta", beta, step=done)
    if not ctx.private:  # wall time depends on the realized (private) batch size: a timing side channel
        ctx.log("perf/steps_per_sec", 1.0 / max(time.perf_counter() - t0, 1e-9), step=done)
    row["epsilon"] = eps
    row["_evaluation"] = evaluation
    return row


def _export_ppo(actor: PolicyValueModel, tokenizer: Any, out: Path) -> None:
    from trainers.models.lora import merge_and_save

    actor.policy.save_pretrained(str(out / "adapter"))
    actor.save_head(out / "value_head.safetensors")
    merge_and_save(actor.policy, tokenizer, out / "model")


def rollout_used_ray(use_ray: bool, pcfg: Any) -> bool:
    return bool(use_ray and pcfg.rollout_actors >= 1)


def _log_eval(ctx: StageContext, ev: PublicEval, *, step: int) -> None:
    """Public-prompt statistics: free to log (no private data involved)."""
    ctx.log("ppo/reward", ev.reward, step=step)
    ctx.log("ppo/kl", ev.kl, step=step)
    ctx.log("eval/gold_reward", ev.gold_reward, step=step)


__all__ = ["PPOPlan", "UnsupportedPPOConfig", "check_supported", "learn_ppo", "rollout_seed", "run_ppo", "shard_batch"]
