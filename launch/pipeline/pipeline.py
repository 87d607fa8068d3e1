"""`dpalign run`: data -> base model (cached) -> DP-SFT -> DP reward model -> DP-PPO -> evaluation -> report.

The driver owns the run directory and the write-ahead ledger. Before any stage runs (before any privacy is
spent) it loads every stage's data, computes the composition mode from the stages' user ids (parallel when no
user is in two private stages, sequential otherwise -- never from a flag), each stage's (epsilon, delta) target,
and refuses an overlap without a configured budget split. Each stage is a plain recipe
(``trainers.stages.sft/rm/ppo``) run inside ``RunDir.stage``, so a crash leaves either a finished stage or none;
``--resume`` skips finished stages and appends to the same ledger (never rolled back); a stage that crashed
mid-way continues from its checkpoint (``RUN_DIR/checkpoints/<stage>``, every ``run.checkpoint_every`` steps,
passed as ``StageContext.checkpoint_dir``) at the ledger's count of its steps, never retaking a recorded step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dpalign.logs import quiet_libraries
from trainers.stages.plan import STAGE_ORDER, PrivacyPlan, prepare_run
from trainers.stages.summary import StageSummary

__all__ = ["run_pipeline", "preflight_cluster", "quiet_libraries", "prepare_run", "PrivacyPlan", "STAGE_ORDER",
           "LEARNER_STAGES"]

LEARNER_STAGES = ("sft", "rm", "ppo")
"""Stages whose learner runs on Ray Train TorchTrainer workers when ray.num_workers >= 1."""


def run_pipeline(cfg: Any, *, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole private alignment pipeline; returns the report (also written to the run dir)."""
    import torch

    from accounting.ledger import Ledger
    from launch.pipeline.loggers import make_sinks
    from launch.pipeline.metrics import MetricsLogger, read_metrics
    from launch.pipeline.report import (
        StagePrivacy,
        build_report,
        series_from_metrics,
        stage_entry,
        write_report,
    )
    from launch.pipeline.rundir import RunDir, RunDirError
    from trainers.data.io import load_eval_prompts, load_preferences, load_prompts, load_public, load_sft
    from trainers.data.task import build_task
    from trainers.models.base import ensure_base_model, load_base_model, validation_windows
    from trainers.models.export import write_stage_exports
    from trainers.stages.context import StageContext, noise_disclosure

    quiet_libraries()
    t_start = time.time()
    wall: dict[str, float] = {}
    resumed = RunDir.resume(resume, cfg) if resume else None

    # --- data and base model (cached by config hash) -----------------------------------------------------------
    t = time.time()
    task = build_task(cfg.data, cache_dir=cfg.run.cache_dir, progress=progress)
    sft_data, rm_data, ppo_data = load_sft(task.sft), load_preferences(task.rm), load_prompts(task.ppo)
    stage_users = {
        "sft": set(sft_data.rows["user_id"]),
        "rm": set(rm_data.rows["user_id"]),
        "ppo": set(ppo_data.rows["user_id"]),
    }
    eval_prompts = list(load_eval_prompts(task.eval).rows["prompt"])[: cfg.eval.prompts]
    # Public text of the domain the stages fine-tune on (task.validation_text: public_valid unless the private users
    # write another domain): SFT's validation loss (the learned controller's reward), the reward model's public
    # gold pairs, PPO's language-model loss and the evaluation's perplexity.
    validation_texts = list(load_public(task.validation_text).rows["text"]) if task.validation_text else []
    wall["data"] = time.time() - t

    # --- privacy plan: every stage's q, T, K, target and sigma, decided once before any step, from the data ------
    # An impossible plan (shared users without a split, q > 1) is refused here: no run directory is made.
    plan = prepare_run(cfg, stage_users)

    t = time.time()
    base = ensure_base_model(
        cfg.model, cfg.data, cache_dir=cfg.run.cache_dir, public_train=task.public_train or None,
        public_valid=task.public_valid or None, progress=progress,
    )
    base_dir = Path(base.path)
    wall["base_model"] = time.time() - t
    # A controller to reuse must fit this run before anything is spent or made (controller/reuse.py).
    _check_controller_reuse(cfg, plan, base_dir)
    # On a cluster, every node must reach the base model and the run directory before the first release.
    ray_started = preflight_cluster(cfg, base_dir=base_dir, run_dir=Path(resumed.path) if resumed else None)
    run = resumed if resumed is not None else RunDir.for_config(cfg)
    metrics = MetricsLogger(run.tb_dir, run.metrics_path, sinks=make_sinks(
        cfg.run.loggers, tb_dir=run.tb_dir, run_dir=run.path, run_id=run.run_id,
        wandb_project=cfg.run.wandb_project, wandb_mode=cfg.run.wandb_mode,
        mlflow_tracking_uri=cfg.run.mlflow_tracking_uri, mlflow_experiment=cfg.run.mlflow_experiment),
        # a private stage's step times follow its private batch sizes: not published unless asked
        withheld_time_stages=() if cfg.run.report_wall_time else plan.private)
    metrics.log_config(cfg)
    _, tokenizer = load_base_model(base_dir)
    windows = (
        validation_windows(tokenizer, validation_texts, model_cfg=cfg.model, count=cfg.eval.perplexity_records)
        if validation_texts
        else None
    )

    policy_factory = None
    if cfg.controller.enabled:  # the learned clip/noise controller, handed to the stages (they never import it)
        from controller.policy import controller_policy_factory

        # each stage's controller exports itself to RUN_DIR/controller/<stage> when the stage's steps are done
        policy_factory = controller_policy_factory(
            cfg.controller, export_dir=Path(run.path) / "controller", source_run=str(Path(run.path).resolve())
        )

    run.write_plan(plan.to_dict())
    ledger = None
    if plan.private:
        ledger = Ledger.open(
            run.ledger_path, run_id=run.run_id, target_epsilon=plan.target_epsilon, target_delta=plan.delta,
            accountant=plan.accountant, composition=plan.composition, rdp_order=plan.rdp_order,
        )

    # --- the three stages ------------------------------------------------------------------------------------
    summaries: dict[str, StageSummary] = {}
    entries: dict[str, dict[str, Any]] = {}
    try:
        for i, name in enumerate(STAGE_ORDER):
            stage_plan = plan[name]
            if run.is_done(name):
                run.drop_checkpoint(name)  # a crash between the commit and the checkpoint's removal
                info = run.done_info(name) or {}
                summaries[name] = StageSummary.from_dict(info["summary"])
                wall[name] = float(info.get("wall_time_s", 0.0))
            else:
                ended = (ledger.report()["stages"].get(name) or {}).get("status") if ledger is not None else None
                if ended not in (None, "running"):
                    # The ledger closed this stage but the crash came before its outputs were committed: its
                    # releases are spent and the stage cannot take new ones, so this run cannot finish honestly.
                    raise RunDirError(
                        f"{run.path}: stage {name!r} ended in the ledger ({ended}) but its outputs were never "
                        "committed (a crash between the two); its budget is spent. Start a new run directory"
                    )
                distributed = cfg.ray.num_workers >= 1 and name in LEARNER_STAGES
                # One owner of Ray: the run starts (or joins) it from cfg.ray for learners and rollout actors
                # alike, and stops only what it started.
                if distributed or (name == "ppo" and cfg.ppo.rollout_actors > 0):
                    ray_started = _start_ray(cfg) or ray_started
                ctx = StageContext(
                    stage=name, cfg=cfg, private=stage_plan.private, ledger=ledger if stage_plan.private else None,
                    metrics=metrics, plan=stage_plan, target_epsilon=stage_plan.target_epsilon,
                    target_delta=stage_plan.delta,
                    seed=cfg.run.seed * 1000 + i, progress=progress, policy_factory=policy_factory,
                    eval_prompts=eval_prompts, ray_storage=run.path / "ray_train",
                    distributed=distributed, checkpoint_dir=run.checkpoint_dir(name),
                )
                t = time.time()
                torch.manual_seed(ctx.seed)
                try:
                    with run.stage(name) as out:
                        summary = _run_stage(name, ctx, run, out.path, task, base_dir, windows, validation_texts)
                        out.summary.update(summary.to_dict())
                        # Standard exports and model cards, committed with the stage (the ledger read now covers
                        # exactly this stage and the ones before it: what these weights depend on).
                        write_stage_exports(
                            name, out.path, protection={s.stage: s.private for s in plan.stages},
                            ledger_privacy=ctx.ledger.report() if ctx.ledger is not None else (
                                ledger.report() if ledger is not None else None),
                            noise=noise_disclosure(cfg), preset=cfg.privacy.preset, run_id=run.run_id,
                        )
                finally:
                    if ctx.ledger is not None:  # a learner stage hands the ledger to Ray and reopens it
                        ledger = ctx.ledger
                summaries[name] = summary
                wall[name] = time.time() - t
            summary = summaries[name]
            sp = None
            if stage_plan.private and ledger is not None:
                sigma_eff = float(summary.noise_multiplier or 0.0)
                mech = summary.mechanism or {}
                sp = StagePrivacy(
                    target_epsilon=stage_plan.target_epsilon, delta=stage_plan.delta,
                    epsilon_spent=float(ledger.report()["stages"][name]["epsilon"]),
                    accountant=ledger.run.accountant, composition=plan.composition,
                    noise_multiplier=sigma_eff, sampling_rate=stage_plan.sampling_rate,
                    steps=summary.steps, repeats=stage_plan.repeats,
                    num_users=stage_plan.num_users, expected_batch_users=stage_plan.expected_batch_users,
                    grad_noise_multiplier=float(mech.get("grad_noise_multiplier", sigma_eff)),
                    count_noise_std=mech.get("count_noise_std"), num_groups=int(mech.get("num_groups", 0)),
                )
            timed = not stage_plan.private or cfg.run.report_wall_time
            entries[name] = stage_entry(
                private=stage_plan.private, reason=stage_plan.reason, status=summary.status,
                wall_time_s=wall[name] if timed else None, privacy=sp, metrics=_public_metrics(summary),
            )

        # --- evaluation on public prompts (post-processing) --------------------------------------------------
        t = time.time()
        evaluation = _evaluate(cfg, run, base_dir, eval_prompts, windows, summaries, progress)
        wall["eval"] = time.time() - t
    finally:
        metrics.close()
        if ray_started:
            from cluster.runtime import shutdown_ray

            shutdown_ray()
    wall["total"] = time.time() - t_start
    # A private stage's wall time follows its private batch sizes (unaccounted): published only when asked.
    withheld = {name for name, e in entries.items() if e["wall_time_s"] is None}
    published = {k: v for k, v in wall.items() if k not in withheld and not (k == "total" and withheld)}
    status = "completed" if all(e["status"] == "completed" for e in entries.values()) else "partial"
    report = build_report(
        run_id=run.run_id, preset=cfg.privacy.preset, status=status, stages=entries,
        ledger_privacy=ledger.report() if ledger is not None else None, evaluation=evaluation,
        series=series_from_metrics(read_metrics(run.metrics_path)), wall_time_s=published,
        noise=noise_disclosure(cfg),
    )
    if ledger is not None:
        ledger.close()
    # Record counts of the private splits are not published (one user changes them); user counts N are part of the
    # public plan (the accountant's q and B = qN use them).
    report["privacy_plan"] = plan.to_dict()
    report["task"] = {
        "source": cfg.data.source,
        "users": {name: len(ids) for name, ids in stage_users.items()},
        "per_record_users": list(task.per_record_users),
    }
    m = base.metrics
    report["base_model"] = {
        "path": str(base_dir),
        "built": bool(base.built),
        "params": m.params if m else None,
        "perplexity": m.ppl if m else None,
        "unigram_perplexity": m.unigram_ppl if m else None,
    }
    write_report(report, report_json=run.report_json, report_md=run.report_md, plots_dir=run.plots_dir)
    report["_run_dir"] = str(Path(run.path).resolve())  # the job prints where its outputs are, absolute
    return report


def _check_controller_reuse(cfg: Any, plan: PrivacyPlan, base_dir: Path) -> None:
    """``controller.load`` with ``controller.enabled``: every private stage finds an artifact of the configured
    granularity; at module / lora_param each stage's clipping groups (its model built from the base model's
    architecture) must be the artifact's. Raises controller.reuse.ControllerReuseError (exit 2) before the ledger
    or run directory exist."""
    ctrl = cfg.controller
    if not (ctrl.enabled and ctrl.load):
        return
    from controller.reuse import check_reuse

    stages = [name for name in STAGE_ORDER if plan[name].private]
    names: dict[str, list[str]] = {}
    if ctrl.granularity != "bucket":
        from trainers.stages.learner import stage_group_names

        names = stage_group_names(cfg, base_dir, stages)
    check_reuse(ctrl, stages=stages, group_names=names)


def preflight_cluster(cfg: Any, *, base_dir: Path, run_dir: Path | None) -> bool:
    """Before any privacy is spent: when the run joins a Ray cluster (``ray.address`` or RAY_ADDRESS) and uses
    Ray Train learners or rollout actors, check on every node that the base model can be read and the run's
    output directory written (``cluster.preflight``). An embedded Ray is this machine only: nothing to check.

    Returns:
        True when this call started Ray (the run stops it at the end).

    Raises:
        cluster.preflight.PreflightError: a node cannot reach a path (names the node, path and config field).
    """
    from cluster.runtime import resolve_address

    uses_ray = cfg.ray.num_workers >= 1 or cfg.ppo.rollout_actors > 0
    if not uses_ray or resolve_address(cfg.ray.address) is None:
        return False
    from cluster.preflight import PathNeed, require_reachable

    started = _start_ray(cfg)
    # The run directory itself does not exist yet: probe where it will be made (its parent).
    out = str(run_dir) if run_dir is not None else (str(Path(cfg.run.dir).parent) if cfg.run.dir else cfg.run.out_dir)
    needs = [PathNeed(str(base_dir), "read", "run.cache_dir"),
             PathNeed(out, "write", "run.dir" if cfg.run.dir else "run.out_dir")]
    if cfg.ray.storage_path and "://" not in cfg.ray.storage_path:
        needs.append(PathNeed(cfg.ray.storage_path, "write", "ray.storage_path"))
    try:
        require_reachable(needs)
    except BaseException:
        if started:
            from cluster.runtime import shutdown_ray

            shutdown_ray()
        raise
    return started


def _start_ray(cfg: Any) -> bool:
    """Start (embedded) or join Ray for the learners; True when this call started it (so the run stops it)."""
    from cluster.runtime import init_ray

    return init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus or None).started_here


def _public_metrics(summary: StageSummary) -> dict[str, float]:
    """Numbers from a stage summary that are public (public held-out data) -- never private-batch statistics."""
    keys = ("public_valid_loss", "public_valid_loss_start", "accuracy", "accuracy_start", "final_public_reward",
            "final_public_kl", "final_gold_reward", "sync_bytes", "sync_seconds")
    return {k: float(summary[k]) for k in keys if isinstance(summary.get(k), (int, float))}


def _run_stage(name: str, ctx: Any, run: Any, out_dir: Path, task: Any, base_dir: Path, windows: Any,
               validation_texts: list[str]) -> StageSummary:
    if name == "sft":
        from trainers.stages.sft import run_sft

        return run_sft(ctx, base_dir=base_dir, data_path=task.sft, out_dir=out_dir, public_windows=windows)
    if name == "rm":
        from trainers.stages.rm import run_rm

        return run_rm(ctx, sft_dir=run.stage_dir("sft") / "model", data_path=task.rm, out_dir=out_dir,
                      public_texts=validation_texts)
    from trainers.stages.ppo import run_ppo

    return run_ppo(ctx, sft_dir=run.stage_dir("sft") / "model", rm_dir=run.stage_dir("rm"), prompts_path=task.ppo,
                   out_dir=out_dir, public_windows=windows, eval_prompts=ctx.eval_prompts,
                   use_ray=ctx.cfg.ppo.rollout_actors > 0)


def _evaluate(cfg: Any, run: Any, base_dir: Path, prompts: list[str], windows: Any,
              summaries: dict[str, StageSummary], progress: bool) -> dict[str, Any]:
    from trainers.data.chat import configure_chat
    from trainers.models.base import load_base_model
    from trainers.stages.evaluate import evaluate_policy

    policies: dict[str, Any] = {}
    sft_model, _ = load_base_model(run.stage_dir("sft") / "model")
    for name, path in (("base", base_dir), ("sft", run.stage_dir("sft") / "model"),
                       ("final", run.stage_dir("ppo") / "model")):
        model, tok = load_base_model(path)
        configure_chat(tok, cfg.data.chat_template)  # the base tokenizer too: every policy sees the same layout
        policies[name] = evaluate_policy(
            model, tok, prompts, eval_cfg=cfg.eval, reference=None if name == "sft" else sft_model,
            public_windows=windows,
        )
    rm = summaries.get("rm", {})
    return {
        "prompts": len(prompts),
        "seeds": list(cfg.eval.seeds),
        "policies": policies,
        "reward_model": {"accuracy": float(rm["accuracy"]), "pairs": int(rm["gold_pairs"])} if "accuracy" in rm else None,
    }
