"""Reusing what a run learned: the checks that run before any privacy is spent.

A run with ``controller.enabled=true`` exports each private stage's controller into ``RUN_DIR/controller/<stage>``
(``LearnedController.export_dir``). Another run reuses it with ``controller.load=RUN_DIR/controller`` and
``controller.mode=frozen|finetune``: each stage loads its own sub-directory (or every stage the same artifact
when ``controller.load`` points at one artifact directory; :func:`controller.artifact.resolve_artifact_dir`).

:func:`check_reuse` is called by the pipeline after the privacy plan is made and before the ledger or the run
directory exist: a missing artifact, a granularity other than the config's, or (module / lora_param) spaces
built for other clipping groups is refused there, naming the field and the fix. The exact group list of a stage
is checked again when its engine is built (``LearnedController``), before that stage's first release.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from controller.artifact import ControllerArtifact, load_artifact, resolve_artifact_dir
from controller.config import ControllerConfig
from controller.spaces import SpaceMismatch


class ControllerReuseError(ValueError):
    """``controller.load`` names an artifact this run cannot use (missing, another granularity, other groups)."""


def check_reuse(
    config: ControllerConfig,
    *,
    stages: Sequence[str],
    group_names: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, ControllerArtifact]:
    """Load the artifact of every controlled stage and check that it fits, before any release.

    Args:
        config: the ``controller`` section (nothing to check unless enabled with ``load``).
        stages: the private stages the controller will run.
        group_names: per stage, the engine's clipping-group names known before the run (the pipeline builds
            them from the base model's architecture, ``trainers.stages.learner.stage_group_names``); checked
            exactly at module / lora_param.

    Raises:
        ControllerReuseError: naming ``controller.load`` / ``controller.granularity`` and the fix.
    """
    if not config.enabled or not config.load:
        return {}
    out: dict[str, ControllerArtifact] = {}
    for stage in stages:
        try:
            art = load_artifact(resolve_artifact_dir(config.load, stage))
        except (FileNotFoundError, ValueError) as err:
            raise ControllerReuseError(f"controller.load: {err}") from None
        spec = art.spec
        if spec.granularity != config.granularity:
            raise ControllerReuseError(
                f"controller.load={art.path}: the artifact was trained at granularity {spec.granularity!r}, the run "
                f"asks controller.granularity={config.granularity}; set controller.granularity={spec.granularity} "
                "(and the engine.clipping it needs) or load an artifact trained at this granularity"
            )
        names = (group_names or {}).get(stage)
        if names is not None:
            try:
                spec.check_groups(names)
            except SpaceMismatch as err:
                raise ControllerReuseError(f"controller.load={art.path} (stage {stage}): {err}") from None
        out[stage] = art
    return out
