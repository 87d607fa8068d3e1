"""``LearnedController``: the SAC hyper-policy as a clip/noise policy of the DP engine (trainers/engine/policy.py).

Every ``interval`` steps it builds the observation from what the engine RELEASED (``ReleasedStep`` -> our
``Released`` record: noisy gradient norms, agreement with the previous noisy update, noisy clip counts when the
plan paid for them), the ledger state and the public validation loss; asks the actor for an action; maps it to
per-module thresholds C_k and a noise multiplier sigma; and passes sigma through the budget layer, which clamps it
to the floor that keeps every remaining planned step affordable. Between decisions the same (C_k, sigma proposal)
is re-checked against the floor at every step.

Modes: ``frozen`` acts with an artifact's deterministic actor; ``online`` learns a fresh SB3 SAC inside the run
(default DP-SGD action during warm-up); ``finetune`` starts from an artifact and keeps learning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accounting.events import PrivacyEvent
from accounting.mechanisms import grad_noise_for_target
from controller.artifact import (
    ControllerArtifact,
    ObsNorm,
    Provenance,
    load_artifact,
    resolve_artifact_dir,
    save_artifact,
)
from controller.budget import BudgetGuard, SafeAction, SpendMark
from controller.config import ControllerConfig
from controller.records import Released, ValidationStats
from controller.reward import reward_since
from controller.spaces import SpaceMismatch, SpaceSpec, features_from_released, initial_observation

# sigma_eff is recomputed by the engine from (C_k, s_k); a relative 1e-9 margin keeps float rounding from putting
# it a hair under the floor.
SIGMA_MARGIN = 1.0 + 1e-9


def released_from_engine(
    released: Any, *, previous: list[torch.Tensor] | None, event: PrivacyEvent
) -> tuple[Released, list[torch.Tensor]]:
    """Our ``Released`` from the engine's ``ReleasedStep`` (noised quantities only), and the flat noisy update per
    group to compare the next step with. ``previous``: the last step's flat noisy updates (or None)."""
    flat = [
        torch.cat([t.detach().reshape(-1).float() for t in g]) for g in released.noisy_grads
    ]  # per group [d_k]
    cos = [0.0] * len(flat)
    if previous is not None and len(previous) == len(flat):
        cos = [
            float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            for a, b in zip(flat, previous, strict=True)
        ]
    b = float(released.expected_batch_size)
    fractions = None
    if released.noisy_unclipped_counts is not None:
        fractions = tuple(
            1.0 - float(c) / b for c in released.noisy_unclipped_counts
        )  # clipped share (noisy)
    rec = Released(
        step=int(released.step),
        group_names=tuple(g.name for g in released.groups),
        group_sizes=tuple(int(g.numel) for g in released.groups),
        clip_norms=tuple(float(c) for c in released.plan.clip_norms),
        noise_stds=tuple(float(s) for s in released.plan.noise_stds),
        expected_batch_size=b,
        noisy_grad_sq_norms=tuple(float(n) ** 2 for n in released.noisy_grad_norms),
        noisy_cos_prev=tuple(cos),
        noisy_clip_fractions=fractions,
        events=(event,),
    )
    return rec, flat


class LearnedController:
    """The learned controller as a ``ClipNoisePolicy`` (``plan(step, groups)``, ``observe(released)``).

    Args:
        config: the ``controller`` config section.
        target_epsilon, delta: the stage's budget.
        sampling_rate: the stage's Poisson rate q.
        steps: the stage's planned logical steps.
        validation_loss: returns the loss on PUBLIC (or non-private held-out) validation data; called once per
            interval.
        repeats: releases per sample (PPO epochs).
        admit: the ledger's filter (``ledger.admit``); a refused proposal falls back to the floor.
        rdp_order: the ledger's RDP filter order (None: the optimal order for the fixed schedule).
        stage: ledger stage name.
        artifact: a loaded artifact (frozen / finetune); default: the artifact ``config.load`` names for this
            stage (:func:`controller.artifact.resolve_artifact_dir`).
        reference_clips: C_ref per group (the stage's fixed thresholds); default ``config.reference_clip`` each.
        group_names: the engine's clipping-group names in order; required by granularity module / lora_param
            (the spaces have one slot per group), checked against a loaded artifact's before any release.
        export_dir: when set, the controller writes its artifact there once the stage's last planned step is
            released (``RUN_DIR/controller/<stage>`` in a pipeline run): what ``controller.load`` reuses.
        source_run: the run directory recorded in the export's provenance.

    Raises:
        controller.spaces.SpaceMismatch: the artifact's granularity or groups do not fit (before any release).
    """

    def __init__(
        self,
        *,
        config: ControllerConfig,
        target_epsilon: float,
        delta: float,
        sampling_rate: float,
        steps: int,
        validation_loss: Callable[[], float],
        repeats: int = 1,
        admit: Callable[[PrivacyEvent], Any] | None = None,
        rdp_order: float | None = None,
        stage: str = "sft",
        artifact: ControllerArtifact | None = None,
        reference_clips: Sequence[float] | None = None,
        group_names: Sequence[str] | None = None,
        export_dir: str | Path | None = None,
        source_run: str = "",
    ) -> None:
        config.check()
        self.config = config
        self.validation_loss = validation_loss
        self.guard = BudgetGuard(
            target_epsilon=target_epsilon,
            delta=delta,
            sampling_rate=sampling_rate,
            steps=steps,
            repeats=repeats,
            rdp_order=rdp_order,
            max_noise_multiplier=config.max_noise_multiplier,
            admit=(lambda e: bool(admit(e))) if admit is not None else None,
            stage=stage,
        )
        if artifact is None and config.load:
            artifact = load_artifact(resolve_artifact_dir(config.load, stage))
        self.artifact = artifact
        self.group_names = None if group_names is None else tuple(str(n) for n in group_names)
        self.spec: SpaceSpec = self._spaces(config, artifact)
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.source_run = str(source_run)
        self.exported: Path | None = None
        self.learner = None
        if config.mode in ("online", "finetune"):
            from controller.sb3 import OnlineSAC

            self.learner = OnlineSAC.create(spec=self.spec, config=config, artifact=artifact)
        self.obs_norm: ObsNorm = (
            artifact.obs_norm if artifact is not None else ObsNorm.identity(self.spec.obs_dim)
        )
        self.reference_clips: tuple[float, ...] | None = (
            tuple(float(c) for c in reference_clips) if reference_clips is not None else None
        )
        self._clips: tuple[float, ...] | None = None
        self._sigma = math.nan
        self._obs = initial_observation(self.guard.ledger_state(), spec=self.spec)
        self._action: np.ndarray | None = None
        self._previous_flat: list[torch.Tensor] | None = None
        self._initial_loss: float | None = None
        self._previous_loss: float | None = None
        self._mark = SpendMark(0.0, 0.0, 0)  # the guard's spending when the current interval began
        self._pending_decision = True
        self.last_safe: SafeAction | None = None
        self.history: list[dict[str, float]] = []  # per decision: sigma, epsilon, validation loss, reward

    def _spaces(self, config: ControllerConfig, artifact: ControllerArtifact | None) -> SpaceSpec:
        """The spaces: the artifact's (checked against the config's granularity and the engine's groups), or the
        config's for these groups."""
        if artifact is None:
            if config.granularity != "bucket" and self.group_names is None:
                raise ValueError(
                    f"controller.granularity={config.granularity} needs the engine's clipping-group names "
                    "(group_names): the spaces have one slot per group"
                )
            return config.spec(self.group_names or ())
        spec = artifact.spec
        where = artifact.path or "the artifact"
        if spec.granularity != config.granularity:
            raise SpaceMismatch(
                f"controller.load={where}: the artifact was trained at granularity {spec.granularity!r} but "
                f"controller.granularity={config.granularity}; set controller.granularity={spec.granularity} (and "
                "the engine.clipping it needs) or load an artifact trained at this granularity"
            )
        if self.group_names is not None:
            try:
                spec.check_groups(self.group_names)
            except SpaceMismatch as err:
                raise SpaceMismatch(f"controller.load={where}: {err}") from None
        return spec

    # --- the engine's policy protocol ----------------------------------------------------------------------
    def plan(self, step: int, groups: Sequence[Any]) -> Any:
        from trainers.engine.policy import StepPlan

        self.spec.check_groups([g.name for g in groups])
        if self.reference_clips is None:
            self.reference_clips = (self.config.reference_clip,) * len(groups)
        if self._initial_loss is None:
            self._initial_loss = self._previous_loss = float(self.validation_loss())
        if len(groups) != len(self.reference_clips):
            raise ValueError(
                f"controller planned for {len(self.reference_clips)} groups, engine has {len(groups)}"
            )
        if self._pending_decision:  # first step, or an interval just ended in observe()
            self._decide()
        safe = self.guard.safe_action(clip_norms=self._clips, sigma=self._sigma)
        self.last_safe = safe
        sigma = safe.noise_multiplier * SIGMA_MARGIN
        total = math.sqrt(sum(c * c for c in safe.clip_norms))
        k = len(safe.clip_norms)
        if self.config.count_noise_std <= 0:
            return StepPlan(clip_norms=safe.clip_norms, noise_stds=(sigma * total,) * k)
        # Noisy clip counts (feature source (b)): the gradient gets less precision so that gradient + counts
        # together are one Gaussian with multiplier sigma (Andrew et al.); the engine recomputes that sigma_eff.
        count_std = max(
            self.config.count_noise_std, math.sqrt(k) * sigma
        )  # counts take <= 1/4 of the precision
        z_grad = grad_noise_for_target(target_multiplier=sigma, count_noise_std=count_std, num_counts=k)
        return StepPlan(
            clip_norms=safe.clip_norms, noise_stds=(z_grad * total,) * k, count_noise_std=count_std
        )

    def observe(self, released: Any) -> None:
        if released.release != 0:  # later releases of a reused sample: same event, already counted
            return
        event = PrivacyEvent(
            stage=self.guard.stage,
            step=int(released.step),
            purpose="gradient",
            sampling_rate=self.guard.sampling_rate,
            noise_multiplier=released.plan.effective_noise_multiplier(),
            repeats=self.guard.repeats,
        )
        self.guard.record(event)
        record, self._previous_flat = released_from_engine(
            released, previous=self._previous_flat, event=event
        )
        done = self.guard.steps_left == 0
        if self.guard.steps_done % self.config.interval == 0 or done:
            self._end_interval(record, done)
        if done and self.export_dir is not None and self.exported is None:
            self.exported = self.export_artifact(self.export_dir, provenance=self.provenance())

    # --- decisions -----------------------------------------------------------------------------------------
    def _end_interval(self, record: Released, done: bool) -> None:
        loss = float(self.validation_loss())
        assert self._initial_loss is not None and self._previous_loss is not None
        validation = ValidationStats(
            loss=loss, previous_loss=self._previous_loss, initial_loss=self._initial_loss
        )
        obs = features_from_released(
            record,
            self.guard.ledger_state(),
            validation,
            spec=self.spec,
            reference_clips=self.reference_clips,
        )
        reward = reward_since(
            self._mark, self.guard, config=self.config, previous_loss=self._previous_loss, loss=loss,
            initial_loss=self._initial_loss,
        )
        now = self.guard.mark()
        if self.learner is not None and self._action is not None:
            self.learner.add(self._obs, self._action, reward, obs, done)
            self.learner.update()
        self.history.append(
            {
                "step": self.guard.steps_done,
                "sigma": self.guard.sigma_current,
                "epsilon": now.epsilon,
                "budget_share": now.budget_share,
                "validation_loss": loss,
                "reward": reward,
            }
        )
        self._obs, self._previous_loss, self._mark = obs, loss, now
        self._pending_decision = True

    def _decide(self) -> None:
        if self.learner is not None:
            action = self.learner.act(self._obs)
        elif self.artifact is not None:
            action = self.artifact.act(self._obs)
        else:  # pragma: no cover - config.check() makes frozen require an artifact
            raise RuntimeError("frozen controller without an artifact")
        self._action = np.asarray(action, dtype=np.float32)
        self._clips, self._sigma = self.spec.decode_action(
            self._action, reference_clips=self.reference_clips, sigma_floor=self.guard.floor()
        )
        self._pending_decision = False

    # --- checkpoints and export ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Full controller state for the run's checkpoint: budget history, pending transition, SAC state."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {
            "guard": self.guard.state_dict(),
            "obs": self._obs.tolist(),
            "action": None if self._action is None else self._action.tolist(),
            "clips": self._clips,
            "sigma": self._sigma,
            "reference_clips": self.reference_clips,
            "initial_loss": self._initial_loss,
            "previous_loss": self._previous_loss,
            "eps_at_decision": self._mark.epsilon,
            "share_at_decision": self._mark.budget_share,
            "steps_at_decision": self._mark.steps,
            "pending_decision": self._pending_decision,
            "previous_flat": None
            if self._previous_flat is None
            else [t.tolist() for t in self._previous_flat],
            "history": self.history,
        }
        (d / "controller_state.json").write_text(json.dumps(state))
        if self.learner is not None:
            self.learner.save(d / "sb3")
        return d

    def load(self, directory: str | Path) -> None:
        d = Path(directory)
        state = json.loads((d / "controller_state.json").read_text())
        self.guard.load_state_dict(state["guard"])
        self._obs = np.asarray(state["obs"], dtype=np.float32)
        self._action = None if state["action"] is None else np.asarray(state["action"], dtype=np.float32)
        self._clips = None if state["clips"] is None else tuple(state["clips"])
        self._sigma = float(state["sigma"])
        self.reference_clips = None if state["reference_clips"] is None else tuple(state["reference_clips"])
        self._initial_loss, self._previous_loss = state["initial_loss"], state["previous_loss"]
        # Checkpoints from before gain_per_budget: the interval's budget share counts from the resume.
        self._mark = SpendMark(
            float(state["eps_at_decision"]),
            float(state.get("share_at_decision", self.guard.budget_share())),
            int(state.get("steps_at_decision", self.guard.steps_done)),
        )
        self._pending_decision = bool(state["pending_decision"])
        prev = state["previous_flat"]
        self._previous_flat = None if prev is None else [torch.tensor(t) for t in prev]
        self.history = list(state["history"])
        if self.learner is not None:
            from controller.sb3 import OnlineSAC

            self.learner = OnlineSAC.load(d / "sb3", spec=self.spec, config=self.config)

    def provenance(self) -> Provenance:
        """What this controller was trained on (a run's export): stage, budget, steps, decisions, rewards."""
        learner_curve = list(self.learner.curve) if self.learner is not None else []
        return Provenance(
            trainer="sb3" if self.learner is not None else "frozen",
            model_layers=[],
            task="dpalign-run",
            epsilons=[self.guard.target_epsilon],
            delta=self.guard.delta,
            steps=self.guard.steps,
            env_steps=len(self.history),
            training_curve=learner_curve or [h["reward"] for h in self.history],
            stage=self.guard.stage,
            source_run=self.source_run,
            mode=self.config.mode,
            reward=self.config.reward,
            parent=str(self.artifact.path) if self.artifact is not None and self.artifact.path else "",
            model_groups=list(self.group_names or ()),
        )

    def export_artifact(self, path: str | Path, *, provenance: Provenance) -> Path:
        """Write this controller (its current actor) as an artifact; online/finetune include the SB3 state."""
        if self.learner is not None:
            return self.learner.export(path, provenance=provenance)
        assert self.artifact is not None
        return save_artifact(
            path, spec=self.spec, actor=self.artifact.actor, obs_norm=self.obs_norm, provenance=provenance
        )


def controller_policy_factory(
    config: ControllerConfig, *, export_dir: str | Path | None = None, source_run: str = ""
) -> Callable[..., LearnedController]:
    """A ``StageContext.policy_factory`` (trainers/stages/learner.py ``make_policy``) building the controller.

    The stage passes ``ctx, sigma, groups, expected_batch_size``; the controller also needs the stage's planned
    ``steps``, its rate ``q`` and ``repeats`` (keyword arguments, else the stage's frozen ``ctx.plan``) and a PUBLIC
    ``validation_loss`` callable (keyword argument). The ledger's filter and RDP order come from ``ctx.ledger``; the
    target from the plan; the reference thresholds are the stage's fixed ones (``group_thresholds``).
    ``export_dir``: each stage's controller exports itself to ``export_dir/<stage>`` when the stage's last planned
    step is released (a pipeline run passes ``RUN_DIR/controller``).
    """

    def factory(
        *, ctx: Any, sigma: float, groups: Sequence[Any], expected_batch_size: float, **kw: Any
    ) -> LearnedController:
        from trainers.engine.policy import group_thresholds

        plan = getattr(ctx, "plan", None)
        planned = {"steps": plan.steps, "sampling_rate": plan.sampling_rate, "repeats": plan.repeats} if plan else {}

        def need(key: str) -> Any:
            value = kw.get(key, planned.get(key))
            if value is None:
                where = "its StageContext.plan" if key != "validation_loss" else "public evaluation data"
                raise ValueError(
                    f"the learned controller needs {key!r} from the stage recipe (pass it to the policy factory, or "
                    f"give the stage {where})"
                )
            return value

        ledger = ctx.ledger
        accountant = plan.accountant if plan is not None else (ledger.run.accountant if ledger is not None else None)
        if plan is not None:
            order = plan.rdp_order
        else:
            order = ledger.run.rdp_order if ledger is not None and ledger.run.accountant == "rdp" else None
        # the filter: the stage's admit hook (the ledger here, or the driver's sink actor on a Ray Train rank 0)
        admit = kw.get("admit") or (ledger.admit if ledger is not None else None)
        if accountant is not None and accountant != "rdp":
            raise ValueError(
                "controller.enabled needs privacy.accountant=rdp: sigma is chosen from earlier releases, which is "
                "only accounted correctly by the RDP privacy filter"
            )
        return LearnedController(
            config=config,
            target_epsilon=plan.target_epsilon if plan is not None else ctx.target_epsilon,
            delta=plan.delta if plan is not None else ctx.target_delta,
            sampling_rate=float(need("sampling_rate")),
            steps=int(need("steps")),
            repeats=int(kw.get("repeats", planned.get("repeats", 1))),
            validation_loss=need("validation_loss"),
            admit=admit,
            rdp_order=order,
            stage=ctx.stage,
            reference_clips=group_thresholds(ctx.cfg.engine, groups),
            group_names=[g.name for g in groups],
            export_dir=Path(export_dir) / ctx.stage if export_dir is not None else None,
            source_run=source_run,
        )

    return factory
