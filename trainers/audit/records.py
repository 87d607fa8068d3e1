"""Black-box record-canary one-run audit of a REAL stage recipe (Steinke, Nasr & Jagielski 2023, black-box form).

What is audited: the whole stage as the pipeline runs it -- ``trainers.stages.sft.run_sft`` or
``trainers.stages.rm.run_rm`` with a real write-ahead ``Ledger`` (noise calibrated to the stage's target, Poisson
sampling, per-user clipping, the accountant) -- against the epsilon that ledger reports. Only the data is chosen:

* m canary USERS, each with one record, each in the stage's private data iff a fair coin says so
  (``accounting.audit.one_run.draw_inclusion``), added to the stage's real users;
  - SFT: prompt ``"my code is"`` and a response of ``digits`` random digits (``trainers.data.task.plant_canaries``);
  - RM: the same prompt and two random digit strings, the chosen one picked by a coin (a random label direction),
    so no canary agrees with anything the other users teach.
* Score (higher = "looks included"), computed only from the trained model and the STARTING model, both independent
  of the coins except through training:
  - SFT: loss decrease = log-perplexity of the canary's response under the starting (base) model minus under the
    trained model (``trainers.audit.mia.reference_scores``);
  - RM: margin increase = [s(chosen) - s(rejected)] under the trained reward model minus the same under the
    starting reward model (rebuilt with the recipe's own seed and initialization order).
* Guesses: the top/bottom scores over a (k_+, k_-) grid fixed before training, Bonferroni-corrected
  (``audit_scores_best_of``), or one pair fixed in advance.

Claimed epsilon: the ledger's epsilon of the stage at the stage's delta (the same numbers ``dpalign run`` reports).
A non-private stage claims epsilon = inf; its audit is the proof that the scores have power.

Two honest caveats. (1) The recipe sets q = B / N from the realized number of users, so neighbouring datasets
(one canary in or out) run with q differing by a factor N / (N + 1); the claim audited is the realized run's, and
the effect is far below the audit's resolution. (2) With a tiny model and realistic epsilon the attack has little
power: eps_lb is usually 0. A lower bound below the claim is consistent with the guarantee, not a proof of it.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accounting.audit.mia import AucResult, auc_with_ci
from accounting.audit.one_run import OneRunResult, audit_scores, audit_scores_best_of, draw_inclusion

AUDIT_STAGES = ("sft", "rm")
CANARY_USER_PREFIX = "audit-canary-"
"""User ids of audit canaries; never produced by the task generator (its ids are ``u00000``...)."""
KEY_DIGITS = 4
"""Random digits that open each canary's prompt: with a shared prompt, a model cannot tell WHICH secret follows,
so nothing but the secret's digit statistics could be memorized; a per-user key makes each record a key -> value
pair that a model can memorize (Carlini et al.'s canaries are one secret; a one-run audit needs m distinct ones)."""


@dataclass(frozen=True)
class RecordCanaryAuditResult:
    """A black-box record-canary audit of one stage.

    Attributes:
        stage: "sft" or "rm".
        private: whether the stage ran the DP engine (False: the power check, claimed epsilon = inf).
        claimed_epsilon: the ledger's epsilon for the stage (inf when not private).
        delta: the claim's delta, also the audit's null-hypothesis delta.
        accountant: the ledger's accountant ("none" when not private).
        audit: the one-run result (eps_lb, guesses, correct guesses).
        auc: AUC of the canary scores, included vs excluded (a diagnostic of the score's power; it uses the coins).
        flagged: eps_lb > claimed epsilon.
        num_users: users of the stage as trained (real users + included canaries).
        steps: optimizer steps the stage took.
        noise_multiplier: the stage's calibrated sigma (None when not private).
        seconds: wall time of training and scoring.
        scores: [m] canary scores (for plots; not serialized).
        included: [m] bool canary coins (for plots; not serialized).
    """

    stage: str
    private: bool
    claimed_epsilon: float
    delta: float
    accountant: str
    audit: OneRunResult
    auc: AucResult
    flagged: bool
    num_users: int
    steps: int
    noise_multiplier: float | None
    seconds: float
    scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    included: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def verdict(self) -> str:
        """One line: what the numbers mean."""
        eps_lb, conf = self.audit.epsilon_lb, f"{100 * self.audit.confidence:g}%"
        if not self.private:
            return (
                f"no claim (stage {self.stage} not private): eps_lb={eps_lb:.3f} at {conf} confidence, "
                f"canary AUC={self.auc.auc:.3f}"
            )
        if self.flagged:
            return (
                f"FLAGGED: {self.stage} eps_lb={eps_lb:.3f} > claimed eps={self.claimed_epsilon:.3f} at {conf} "
                "confidence: the stage's mechanism or its accounting is broken"
            )
        return (
            f"consistent: {self.stage} eps_lb={eps_lb:.3f} <= claimed eps={self.claimed_epsilon:.3f} ({conf} "
            "confidence); a lower bound below the claim is consistent with the guarantee, not a proof of it"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "record-canary",
            "stage": self.stage,
            "private": self.private,
            "claimed": {"epsilon": _finite(self.claimed_epsilon), "delta": self.delta, "accountant": self.accountant},
            "audit": self.audit.to_dict(),
            "auc": self.auc.to_dict(),
            "flagged": self.flagged,
            "num_users": self.num_users,
            "steps": self.steps,
            "noise_multiplier": self.noise_multiplier,
            "seconds": self.seconds,
            "verdict": self.verdict,
        }


def _finite(x: float) -> float | None:
    """JSON has no infinity: an absent claim is null."""
    return x if math.isfinite(x) else None


def canary_user_ids(m: int) -> list[str]:
    return [f"{CANARY_USER_PREFIX}{i:05d}" for i in range(m)]


def sft_canary_rows(m: int, *, seed: int, digits: int) -> list[dict[str, Any]]:
    """m SFT canary records (one user each): ``"my code is" -> " d1 ... d_digits"``, seeded."""
    from trainers.data.task import plant_canaries

    ids = canary_user_ids(m)
    _, keys = plant_canaries([], ids, seed=seed + 104729, digits=KEY_DIGITS)
    rows, _ = plant_canaries([], ids, seed=seed, digits=digits)
    for row, key in zip(rows, keys, strict=True):
        row["prompt"] = f"{key.secret} {row['prompt']}"  # a per-user random key before the shared prefix
    return rows


def rm_canary_rows(m: int, *, seed: int, digits: int) -> list[dict[str, Any]]:
    """m RM canary pairs (one user each): two random digit strings, the chosen one drawn by a fair coin."""
    from trainers.data.task import plant_canaries

    ids = canary_user_ids(m)
    _, first = plant_canaries([], ids, seed=seed, digits=digits)
    _, second = plant_canaries([], ids, seed=seed + 7919, digits=digits)
    direction = np.random.default_rng([seed, 17]).random(m) < 0.5  # [m] the random label direction
    rows = []
    for a, b, a_wins in zip(first, second, direction, strict=True):
        chosen, rejected = (a.secret, b.secret) if a_wins else (b.secret, a.secret)
        rows.append({"user_id": a.user_id, "prompt": a.prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def sft_record_scores(trained: torch.nn.Module, start: torch.nn.Module, tokenizer: Any,
                      rows: Sequence[dict[str, Any]], *, max_len: int) -> np.ndarray:
    """Loss decrease of each (prompt, response) record, [R]: log-ppl(start) - log-ppl(trained) on the response."""
    from trainers.audit.mia import reference_scores
    from trainers.rlhf.sft import tokenize_sft_pairs

    batch = tokenize_sft_pairs(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                               max_length=max_len)
    return reference_scores(trained, start, batch.input_ids, batch.attention_mask, loss_mask=batch.loss_mask)


def rm_margins(model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_len: int) -> np.ndarray:
    """s(prompt + chosen) - s(prompt + rejected) under a reward model, [R]."""
    from trainers.stages.rm import score_texts

    chosen = score_texts(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows], max_len=max_len)
    rejected = score_texts(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows], max_len=max_len)
    return (chosen - rejected).double().numpy()


def starting_reward_model(cfg: Any, *, sft_dir: str | Path, seed: int) -> torch.nn.Module:
    """The reward model exactly as ``run_rm`` initializes it (same seed, same order of random draws).

    The LoRA's B matrices start at zero, so the backbone is the SFT model; the head is the seeded random init.
    """
    from trainers.models.base import load_base_model
    from trainers.models.lora import add_lora
    from trainers.rlhf.heads import ScoreModel

    lora = cfg.rm.lora
    torch.manual_seed(seed)
    backbone, _ = load_base_model(sft_dir)
    backbone = add_lora(backbone, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                        target_modules=tuple(lora.target_modules))
    model = ScoreModel(backbone)
    model.eval()
    return model


def run_record_canary_audit(
    cfg: Any,
    *,
    stage: str,
    m: int = 64,
    digits: int = 8,
    confidence: float = 0.95,
    seed: int = 0,
    guesses: tuple[int, int] | None = None,
    sft_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    progress: bool = False,
) -> RecordCanaryAuditResult:
    """Plant m record canaries as extra users of ``stage``, train the real recipe once, score, and bound eps.

    Args:
        cfg: the root RunConfig (data, model, privacy, engine and the stage's section are used as in a run).
        stage: "sft" or "rm".
        m: canary users (each included with probability 1/2).
        digits: random digits per canary secret (more digits, more to memorize).
        confidence: 1 - beta of the bound.
        seed: seeds the coins and the canary secrets (the stage's own seed is the pipeline's,
            ``cfg.run.seed * 1000 + stage index``).
        guesses: (k_pos, k_neg) fixed in advance; None tries ``default_candidates(m)`` with Bonferroni.
        sft_dir: the reward model's starting point (default: the base model; public, independent of D2).
        work_dir: where the augmented data, ledger and model go (default: a temporary directory, removed).
        progress: show progress bars.

    Raises:
        ValueError: unknown stage, m < 2, or digits < 1.
        trainers.stages.config.CompositionError: the config's stages share users without a budget split.
    """
    if stage not in AUDIT_STAGES:
        raise ValueError(f"stage={stage!r}: the record-canary audit covers {AUDIT_STAGES} (PPO has no records to plant)")
    if m < 2:
        raise ValueError(f"m={m}: need at least 2 canaries")
    if digits < 1:
        raise ValueError(f"digits={digits}: must be >= 1")
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix=f"dpalign-audit-{stage}-") as tmp:
            return run_record_canary_audit(
                cfg, stage=stage, m=m, digits=digits, confidence=confidence, seed=seed, guesses=guesses,
                sft_dir=sft_dir, work_dir=tmp, progress=progress,
            )
    return _run(cfg, stage=stage, m=m, digits=digits, confidence=confidence, seed=seed, guesses=guesses,
                sft_dir=sft_dir, work=Path(work_dir), progress=progress)


def _run(cfg: Any, *, stage: str, m: int, digits: int, confidence: float, seed: int,
         guesses: tuple[int, int] | None, sft_dir: str | Path | None, work: Path, progress: bool
         ) -> RecordCanaryAuditResult:
    from accounting.ledger import Ledger
    from dpalign.logs import quiet_libraries
    from trainers.data.io import load_preferences, load_prompts, load_public, load_sft, write_jsonl
    from trainers.data.task import build_task
    from trainers.models.base import ensure_base_model, load_base_model
    from trainers.stages.context import StageContext
    from trainers.stages.plan import STAGE_ORDER, prepare_run

    quiet_libraries()
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    task = build_task(cfg.data, cache_dir=cfg.run.cache_dir, progress=progress)
    base = Path(ensure_base_model(
        cfg.model, cfg.data, cache_dir=cfg.run.cache_dir, public_train=task.public_train or None,
        public_valid=task.public_valid or None, progress=progress,
    ).path)

    # --- the population: real users + the included canaries ---------------------------------------------------
    included = draw_inclusion(m, seed=seed)  # [m] the coins, drawn before anything is trained
    loader = load_sft if stage == "sft" else load_preferences
    real = loader(task.sft if stage == "sft" else task.rm).rows.to_list()
    canaries = (sft_canary_rows if stage == "sft" else rm_canary_rows)(m, seed=seed, digits=digits)
    data_path = work / f"{stage}.jsonl"
    write_jsonl(data_path, real + [row for row, keep in zip(canaries, included, strict=True) if keep])

    stage_users = {
        "sft": set(load_sft(task.sft).rows["user_id"]),
        "rm": set(load_preferences(task.rm).rows["user_id"]),
        "ppo": set(load_prompts(task.ppo).rows["user_id"]),
    }
    stage_users[stage] = {r["user_id"] for r in real} | {
        r["user_id"] for r, keep in zip(canaries, included, strict=True) if keep
    }
    plan = prepare_run(cfg, stage_users)  # the pipeline's own plan, over the population with the canaries
    stage_plan = plan[stage]
    private = stage_plan.private
    n = len(stage_users[stage])
    ledger = None
    if private:
        ledger = Ledger.open(
            work / "ledger.jsonl", run_id=f"audit-{stage}-{seed}", target_epsilon=plan.target_epsilon,
            target_delta=plan.delta, accountant=plan.accountant, composition=plan.composition,
            rdp_order=plan.rdp_order,
        )
    # The claim's delta; for a non-private stage, the delta a private run of this config would claim.
    delta = stage_plan.delta if private else (cfg.privacy.delta if cfg.privacy.delta is not None else 1.0 / n)
    ctx = StageContext(
        stage=stage, cfg=cfg, private=private, ledger=ledger, metrics=None, plan=stage_plan,
        target_epsilon=stage_plan.target_epsilon, target_delta=stage_plan.delta,
        seed=cfg.run.seed * 1000 + STAGE_ORDER.index(stage), progress=progress,
    )

    # --- train the real recipe once, then score every canary (in or out) ---------------------------------------
    out = work / "out"
    try:
        torch.manual_seed(ctx.seed)
        if stage == "sft":
            from trainers.stages.sft import run_sft

            summary = run_sft(ctx, base_dir=base, data_path=str(data_path), out_dir=out)
            trained, tokenizer = load_base_model(out / "model")
            start, _ = load_base_model(base)
            scores = sft_record_scores(trained, start, tokenizer, canaries, max_len=cfg.sft.max_len)
        else:
            from trainers.stages.rm import load_reward_model, run_rm

            init = Path(sft_dir) if sft_dir is not None else base
            public = list(load_public(task.validation_text).rows["text"]) if task.validation_text else []
            summary = run_rm(ctx, sft_dir=init, data_path=str(data_path), out_dir=out, public_texts=public)
            trained, tokenizer = load_reward_model(out)
            start = starting_reward_model(cfg, sft_dir=init, seed=ctx.seed)
            scores = rm_margins(trained, tokenizer, canaries, max_len=cfg.rm.max_len) - rm_margins(
                start, tokenizer, canaries, max_len=cfg.rm.max_len
            )
        claimed = float(ledger.epsilon(stage)) if ledger is not None else math.inf
        accountant_name = ledger.run.accountant if ledger is not None else "none"
    finally:
        if ledger is not None:
            ledger.close()

    if guesses is None:
        audit = audit_scores_best_of(scores, included, candidates=None, delta=delta, confidence=confidence)
    else:
        audit = audit_scores(scores, included, k_pos=guesses[0], k_neg=guesses[1], delta=delta,
                             confidence=confidence)
    auc = auc_with_ci(scores[included], scores[~included], confidence=confidence)
    return RecordCanaryAuditResult(
        stage=stage, private=private, claimed_epsilon=claimed, delta=float(delta), accountant=accountant_name,
        audit=audit, auc=auc, flagged=audit.flags(claimed), num_users=n, steps=int(summary["steps"]),
        noise_multiplier=summary.get("noise_multiplier"), seconds=time.perf_counter() - t0,
        scores=scores, included=included,
    )
