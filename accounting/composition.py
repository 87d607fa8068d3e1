"""Stage composition: parallel when no user is in two stages, sequential otherwise (docs/design.md section 2).

The mode follows from the data, never from a flag: it is computed from the stages' user ids, and a config that
claims parallel composition over overlapping users is refused with the number of overlapping users.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Literal

CompositionMode = Literal["parallel", "sequential"]
COMPOSITION_MODES: tuple[str, ...] = ("parallel", "sequential")


class OverlappingStagesError(ValueError):
    """Stages claimed disjoint (parallel composition) share users."""

    def __init__(self, overlap: int, pairs: dict[tuple[str, str], int]) -> None:
        detail = ", ".join(f"{a}&{b}: {n}" for (a, b), n in sorted(pairs.items()))
        super().__init__(
            f"parallel composition claimed but {overlap} users appear in more than one stage ({detail}); "
            f"split the data by user so the stages are disjoint, or use sequential composition with a budget split"
        )
        self.overlap = overlap
        self.pairs = pairs


def user_set_fingerprint(user_ids: Iterable[str]) -> str:
    """sha256 of the sorted distinct user ids, one per line: identifies a stage's user set in the ledger."""
    ids = sorted({str(u) for u in user_ids})
    digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()
    return f"sha256:{digest}"


def _overlaps(stage_user_ids: Mapping[str, Iterable[str]]) -> tuple[int, dict[tuple[str, str], int]]:
    sets = {name: {str(u) for u in ids} for name, ids in stage_user_ids.items()}
    seen: dict[str, int] = {}
    for ids in sets.values():
        for u in ids:
            seen[u] = seen.get(u, 0) + 1
    overlap = sum(1 for n in seen.values() if n > 1)
    names = sorted(sets)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            n = len(sets[a] & sets[b])
            if n:
                pairs[(a, b)] = n
    return overlap, pairs


def composition_mode(stage_user_ids: Mapping[str, Iterable[str]]) -> tuple[CompositionMode, int]:
    """("parallel", 0) when the stages' user sets are disjoint, else ("sequential", #users in >1 stage)."""
    if not stage_user_ids:
        raise ValueError("composition_mode needs at least one stage's user ids")
    overlap, _ = _overlaps(stage_user_ids)
    return ("parallel" if overlap == 0 else "sequential"), overlap


def check_composition_claim(claimed: str, stage_user_ids: Mapping[str, Iterable[str]]) -> CompositionMode:
    """Return the data's mode; raise OverlappingStagesError when ``claimed`` is "parallel" over shared users.

    Claiming "sequential" over disjoint users is allowed (it only over-counts).
    """
    if claimed not in COMPOSITION_MODES:
        raise ValueError(f"composition must be one of {COMPOSITION_MODES}, got {claimed!r}")
    overlap, pairs = _overlaps(stage_user_ids)
    if claimed == "parallel" and overlap:
        raise OverlappingStagesError(overlap, pairs)
    return claimed  # type: ignore[return-value]
