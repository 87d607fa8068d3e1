"""The typed stage summary: one name per common quantity, immutable, and a lossless flat JSON form."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError

import pytest

from trainers.stages.summary import StageSummary


def _summary(**kw):
    base = dict(stage="sft", private=True, status="completed", reason="", steps=3, planned_steps=3,
                noise_multiplier=1.2, epsilon=0.9, wall_time_s=None, mechanism={"num_groups": 2},
                details={"public_valid_loss": 4.5, "history": [{"iteration": 1}]})
    return StageSummary(**{**base, **kw})


def test_reads_as_one_flat_mapping_and_round_trips_through_json():
    s = _summary()
    assert s["steps"] == s.steps == 3 and s["public_valid_loss"] == 4.5 and "history" in s
    back = StageSummary.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.noise_multiplier == 1.2 and back.details["history"] == [{"iteration": 1}]


def test_is_immutable_and_refuses_what_would_blur_its_fields():
    s = _summary()
    with pytest.raises(FrozenInstanceError):
        s.steps = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.details["steps"] = 4  # type: ignore[index]
    with pytest.raises(ValueError, match="shadow"):
        _summary(details={"steps": 9})
    with pytest.raises(ValueError, match="status"):
        _summary(status="crashed")
