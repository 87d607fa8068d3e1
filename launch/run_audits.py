"""Audits of a finished ``dpalign run`` directory: canary exposure of the DP-SFT model, membership inference.

Both read only the run directory (``config.yaml``, ``ledger.jsonl``, ``stages/*``) and the task the config
rebuilds (cached, deterministic), and compare with what the ledger claims.

* Exposure (Carlini et al. 2019): the task plants ``data.canary_users`` secrets ``"my code is" -> " d1 ... d6"``
  in D1. Each secret is ranked among ``num_candidates`` random digit strings of the same length by its total NLL
  under the trained SFT model (``stages/sft/model``); the same ranking under the base model (which never saw D1)
  is the no-memorization baseline (~1 bit).
* Membership inference: members are the users of a stage; non-members are HELD-OUT users drawn by the same
  generator with the same seed and catalogue (``heldout_rows``), so the two groups differ only in membership --
  drawing them with another seed would change the movie catalogue, and an attack would then detect the
  distribution shift, not membership. Scores are per user (the privacy unit): the mean over the user's records.
  - SFT (D1): loss attack (-log-ppl of the response under the SFT model) and reference attack (log-ppl under the
    public base model minus log-ppl under the SFT model).
  - RM (D2): loss attack, log sigmoid of the trained reward model's margin for the labeled direction.
  AUC with a DeLong interval; ``max_auc_under_dp`` is the largest AUC any (eps, delta)-DP mechanism allows a test
  of one user's membership, and an interval above it is flagged.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accounting.audit.exposure import exposure_extrapolated, exposure_sampled
from accounting.audit.mia import auc_with_ci, max_auc_under_dp, tpr_at_fpr


class AuditRunError(ValueError):
    """A run directory cannot be audited as asked; the message names the path and the fix."""


def load_run(run_dir: str | Path) -> tuple[Path, Any]:
    """(run directory, its resolved RunConfig) from ``RUN_DIR/config.yaml``."""
    from launch.config import ConfigError, load_config
    from launch.schema import RunConfig

    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise AuditRunError(f"{path}: no config.yaml; pass the directory `dpalign run` wrote (with report.json)")
    try:
        return path, load_config(RunConfig, str(path / "config.yaml"), [])
    except ConfigError as err:
        raise AuditRunError(f"{path / 'config.yaml'}: {err}") from None


def claimed_privacy(run_dir: Path) -> dict[str, Any]:
    """The ledger's privacy numbers (``accounting.ledger.compute_privacy``), or {} for a run without a ledger."""
    from accounting.ledger import compute_privacy, read_ledger

    path = run_dir / "ledger.jsonl"
    return compute_privacy(read_ledger(path)) if path.is_file() else {}


def _stage_claim(privacy: dict[str, Any], stage: str) -> tuple[float, float | None]:
    entry = privacy.get("stages", {}).get(stage)
    if not entry:
        return math.inf, None
    return float(entry["epsilon"]), float(entry["delta"])


def _model(path: Path) -> tuple[Any, Any]:
    from trainers.models.base import load_base_model

    if not path.exists():
        raise AuditRunError(f"{path}: missing; the stage did not finish (resume the run with `dpalign run --resume`)")
    return load_base_model(path)


def _base_dir(cfg: Any, task: Any) -> Path:
    from trainers.models.base import ensure_base_model

    return Path(ensure_base_model(
        cfg.model, cfg.data, cache_dir=cfg.run.cache_dir, public_train=task.public_train or None,
        public_valid=task.public_valid or None, progress=False,
    ).path)


def _total_nll(model: Any, tokenizer: Any, prompts: list[str], responses: list[str], *, max_len: int) -> np.ndarray:
    """Total NLL (nats) of each response given its prompt, [R], tokenized exactly as DP-SFT trains."""
    from trainers.audit.mia import log_perplexity
    from trainers.rlhf.sft import tokenize_sft_pairs

    batch = tokenize_sft_pairs(tokenizer, prompts, responses, max_length=max_len)
    mean = log_perplexity(model, batch.input_ids, batch.attention_mask, loss_mask=batch.loss_mask)  # [R]
    count = batch.loss_mask[:, 1:].sum(1).double().numpy()  # [R] scored target tokens
    return mean * count


def exposure_audit(run_dir: str | Path, *, num_candidates: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Exposure of each of the task's planted secrets under the run's SFT model and under the base model.

    Candidates are uniform digit strings of the secret's length (the secret excluded), seeded by ``seed``; the
    empirical estimate is capped at log2(num_candidates + 1) bits, the skew-normal extrapolation is not.

    Raises:
        AuditRunError: no config, no SFT model, or a run without canaries (set data.canary_users > 0).
    """
    from dpalign.logs import quiet_libraries
    from trainers.data.task import build_task

    quiet_libraries()
    path, cfg = load_run(run_dir)
    task = build_task(cfg.data, cache_dir=cfg.run.cache_dir, progress=False)
    if not task.canaries:
        raise AuditRunError(
            f"{path}: the run's task has no canaries; rerun with data.canary_users > 0 (data.source=embedded)"
        )
    if num_candidates < 100:
        raise AuditRunError(f"num_candidates={num_candidates}: need at least 100 for the extrapolated exposure")
    sft, tokenizer = _model(path / "stages" / "sft" / "model")
    base, _ = _model(_base_dir(cfg, task))
    eps, delta = _stage_claim(claimed_privacy(path), "sft")
    rng = random.Random(f"exposure:{seed}")
    rows = []
    for canary in task.canaries:
        digits = len(canary.secret.split(" "))
        cands: list[str] = []
        while len(cands) < num_candidates:
            c = " ".join(str(rng.randrange(10)) for _ in range(digits))
            if c != canary.secret:
                cands.append(c)
        texts = [" " + canary.secret] + [" " + c for c in cands]
        prompts = [canary.prompt] * len(texts)
        entry: dict[str, Any] = {"user_id": canary.user_id, "digits": digits}
        for name, model in (("sft", sft), ("base", base)):
            nll = _total_nll(model, tokenizer, prompts, texts, max_len=cfg.sft.max_len)  # [1 + n]
            entry[name] = {
                "exposure": exposure_sampled(float(nll[0]), nll[1:]),
                "exposure_extrapolated": exposure_extrapolated(float(nll[0]), nll[1:]),
                "secret_nll": float(nll[0]),
            }
        rows.append(entry)
    mean_sft = float(np.mean([r["sft"]["exposure"] for r in rows]))
    mean_base = float(np.mean([r["base"]["exposure"] for r in rows]))
    cap = math.log2(num_candidates + 1)
    space = math.log2(10.0) * len(task.canaries[0].secret.split(" "))
    verdict = (
        f"exposure of {len(rows)} planted secrets: mean {mean_sft:.2f} bits under the SFT model vs {mean_base:.2f} "
        f"under the base model (max {cap:.1f} measurable of {space:.1f}); claimed sft eps="
        + (f"{eps:.3f}" if math.isfinite(eps) else "inf (not private)")
    )
    return {
        "kind": "exposure",
        "stage": "sft",
        "claimed": {"epsilon": eps if math.isfinite(eps) else None, "delta": delta},
        "num_candidates": num_candidates,
        "seed": seed,
        "max_measurable_bits": cap,
        "secret_space_bits": space,
        "mean_exposure": mean_sft,
        "mean_exposure_base": mean_base,
        "canaries": rows,
        "verdict": verdict,
    }


def heldout_rows(data_cfg: Any, *, stage: str, count: int) -> list[dict[str, Any]]:
    """Rows of ``count`` NEW users of ``stage`` ("sft" or "rm"), from the task's own generator and seed.

    The task generator draws user ``uid``'s records from ``Random(f"user:{seed}:{uid}")`` and one movie catalogue
    per seed; enlarging ``num_users`` adds users ``u{N}...`` whose records come from exactly the same
    distribution as the members'. Only users with index >= N that land in ``stage`` are returned (no canaries).
    """
    from trainers.data.task import generate_task

    if stage not in ("sft", "rm"):
        raise ValueError(f"stage={stage!r}: held-out users exist for 'sft' and 'rm'")
    n = data_cfg.num_users
    frac = data_cfg.sft_user_fraction if stage == "sft" else data_cfg.rm_user_fraction
    extra = max(8, math.ceil(1.5 * count / frac))
    for _ in range(6):
        big = replace(data_cfg, num_users=n + extra, canary_users=0, public_reviews=10, eval_prompts=1)
        rows = generate_task(big)[stage]
        users = sorted({r["user_id"] for r in rows if int(r["user_id"][1:]) >= n})
        if len(users) >= count:
            keep = set(users[:count])
            return [r for r in rows if r["user_id"] in keep]
        extra *= 2
    raise AuditRunError(f"could not draw {count} held-out {stage} users")  # pragma: no cover


def _per_user(user_ids: list[str], scores: np.ndarray) -> tuple[list[str], np.ndarray]:
    users = sorted(set(user_ids))
    where = {u: i for i, u in enumerate(users)}
    total, count = np.zeros(len(users)), np.zeros(len(users))
    for u, s in zip(user_ids, scores, strict=True):
        total[where[u]] += s
        count[where[u]] += 1
    return users, total / count


def _attack(name: str, members: np.ndarray, nonmembers: np.ndarray, *, eps: float, delta: float | None,
            confidence: float) -> dict[str, Any]:
    auc = auc_with_ci(members, nonmembers, confidence=confidence)
    bound = max_auc_under_dp(eps, delta or 0.0) if math.isfinite(eps) else 1.0
    return {
        "attack": name,
        **auc.to_dict(),
        "tpr_at_fpr_0.1": tpr_at_fpr(members, nonmembers, fpr=0.1),
        "max_auc_under_claim": bound,
        "flagged": auc.low > bound,
    }


def mia_audit(run_dir: str | Path, *, max_users: int = 200, confidence: float = 0.95,
              stages: tuple[str, ...] = ("sft", "rm")) -> dict[str, Any]:
    """Loss and reference membership attacks on the run's SFT model (D1) and loss attack on its reward model (D2).

    Members: up to ``max_users`` users of the stage (the task's canary records left out); non-members: as many
    held-out users (:func:`heldout_rows`).
    """
    from dpalign.logs import quiet_libraries
    from trainers.data.io import load_preferences, load_sft
    from trainers.data.task import CANARY_PREFIX, build_task

    quiet_libraries()
    path, cfg = load_run(run_dir)
    if cfg.data.source != "embedded":
        raise AuditRunError(f"{path}: mia needs held-out users from the embedded task (data.source=embedded)")
    task = build_task(cfg.data, cache_dir=cfg.run.cache_dir, progress=False)
    privacy = claimed_privacy(path)
    out: dict[str, Any] = {"kind": "mia", "confidence": confidence, "stages": {}}
    for stage in stages:
        rows = (load_sft(task.sft) if stage == "sft" else load_preferences(task.rm)).rows.to_list()
        rows = [r for r in rows if r["prompt"] != CANARY_PREFIX]
        member_ids = sorted({r["user_id"] for r in rows})[:max_users]
        keep = set(member_ids)
        members = [r for r in rows if r["user_id"] in keep]
        heldout = heldout_rows(cfg.data, stage=stage, count=len(member_ids))
        eps, delta = _stage_claim(privacy, stage)
        entry: dict[str, Any] = {
            "claimed": {"epsilon": eps if math.isfinite(eps) else None, "delta": delta},
            "num_members": len(member_ids), "num_nonmembers": len({r["user_id"] for r in heldout}), "attacks": [],
        }
        both = members + heldout
        ids = [r["user_id"] for r in both]
        is_member = np.array([u in keep for u in sorted(set(ids))])
        if stage == "sft":
            model, tok = _model(path / "stages" / "sft" / "model")
            base, _ = _model(_base_dir(cfg, task))
            from trainers.audit.records import sft_record_scores

            loss = -_mean_nll(model, tok, both, max_len=cfg.sft.max_len)
            ref = sft_record_scores(model, base, tok, both, max_len=cfg.sft.max_len)
            for name, scores in (("loss", loss), ("reference(base)", ref)):
                _, per_user = _per_user(ids, scores)
                entry["attacks"].append(_attack(name, per_user[is_member], per_user[~is_member], eps=eps,
                                                delta=delta, confidence=confidence))
        else:
            from trainers.audit.records import rm_margins
            from trainers.stages.rm import load_reward_model

            if not (path / "stages" / "rm" / "head.safetensors").is_file():
                raise AuditRunError(f"{path}/stages/rm: missing; the reward-model stage did not finish")
            model, tok = load_reward_model(path / "stages" / "rm")
            margin = torch.from_numpy(rm_margins(model, tok, both, max_len=cfg.rm.max_len))
            scores = torch.nn.functional.logsigmoid(margin).numpy()  # -BT loss of the labeled direction
            _, per_user = _per_user(ids, scores)
            entry["attacks"].append(_attack("loss", per_user[is_member], per_user[~is_member], eps=eps,
                                            delta=delta, confidence=confidence))
        out["stages"][stage] = entry
    attacks = [(s, a) for s, e in out["stages"].items() for a in e["attacks"]]
    best_stage, best = max(attacks, key=lambda sa: sa[1]["auc"])
    flagged = any(a["flagged"] for _, a in attacks)
    out["flagged"] = flagged
    out["verdict"] = (
        ("FLAGGED: " if flagged else "consistent: ")
        + f"best attack {best_stage}/{best['attack']} AUC={best['auc']:.3f} "
        f"[{best['low']:.3f}, {best['high']:.3f}] vs max {best['max_auc_under_claim']:.3f} allowed by the claim"
        + ("" if flagged else "; an AUC below the bound is consistent with the guarantee, not a proof of it")
    )
    return out


def _mean_nll(model: Any, tokenizer: Any, rows: list[dict[str, Any]], *, max_len: int) -> np.ndarray:
    from trainers.audit.mia import log_perplexity
    from trainers.rlhf.sft import tokenize_sft_pairs

    batch = tokenize_sft_pairs(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                               max_length=max_len)
    return log_perplexity(model, batch.input_ids, batch.attention_mask, loss_mask=batch.loss_mask)
