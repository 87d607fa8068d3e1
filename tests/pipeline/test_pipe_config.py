"""Stage configs: defaults valid, every field documented, bad values refused at load time; data-driven privacy."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import pytest

from launch.config import ConfigError, field_docs, load_config
from trainers.stages.config import (
    CompositionError,
    EngineConfig,
    EvalConfig,
    LoraConfig,
    PPOConfig,
    PrivacyConfig,
    RewardModelConfig,
    SFTConfig,
    check_pipeline,
    default_delta,
    presets,
    resolve_composition,
    resolve_deltas,
    stage_targets,
)

SECTIONS = (PrivacyConfig, LoraConfig, EngineConfig, SFTConfig, RewardModelConfig, PPOConfig, EvalConfig)


@dataclass
class _Root:
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def test_defaults_load_and_every_field_is_documented():
    root = load_config(_Root)
    assert root.ppo.objective.gamma == 1.0 and root.ppo.objective.lam == 0.95 and root.ppo.ppo_epochs == 1
    assert root.sft.lora.r == 4 and root.sft.lora.target_modules == ["c_attn"]
    for cls in SECTIONS:
        docs = field_docs(cls)
        undocumented = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not undocumented, f"{cls.__name__}: {undocumented}"


def test_batch_whitening_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"ppo\.objective\.advantage_normalization.*sensitivity"):
        load_config(_Root, overrides=["ppo.objective.advantage_normalization=batch"])
    ok = load_config(_Root, overrides=["ppo.objective.advantage_normalization=per_trajectory"])
    assert ok.ppo.objective.advantage_normalization == "per_trajectory"


@pytest.mark.parametrize(
    "overrides, field_name",
    [
        (["privacy.sft_share=0.5", "privacy.rm_share=0.3", "privacy.ppo_share=0.3"], "privacy.ppo_share"),
        (["privacy.sft_share=0.5"], "privacy.sft_share"),
        (["privacy.sft_share=-0.2", "privacy.rm_share=0.6", "privacy.ppo_share=0.6"], "privacy.sft_share"),
        (["privacy.target_epsilon=0"], "privacy.target_epsilon"),
        (["privacy.delta=1.5"], "privacy.delta"),
        (["privacy.rdp_order=8"], "privacy.rdp_order"),
        (["privacy.composition=parallel"], "privacy.composition"),
        (["engine.clip_norm=-1"], "engine.clip_norm"),
        (["engine.clipping=per_sample"], "engine.clipping"),
        # "ppo_epochs" only: launch.config.check_tree skips the "ppo." prefix when a message starts with "ppo"
        (["ppo.ppo_epochs=0"], "ppo_epochs"),
        (["ppo.temperature=0"], "ppo.temperature"),
        (["sft.lora.r=0"], "sft.lora.r"),
        (["eval.seeds=[1,1]"], "eval.seeds"),
    ],
)
def test_bad_values_name_the_field(overrides, field_name):
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        load_config(_Root, overrides=overrides)


def test_records_longer_than_a_built_models_context_are_refused_at_load():
    """A record longer than model.n_positions would crash the first forward after the run had started."""
    from launch.schema import RunConfig

    for stage in ("sft", "rm"):
        with pytest.raises(ConfigError, match=rf"{stage}\.max_len.*model\.n_positions=128"):
            load_config(RunConfig, overrides=["model.n_positions=128", f"{stage}.max_len=129"])
    load_config(RunConfig, overrides=["model.n_positions=128", "rm.max_len=128"])
    load_config(RunConfig, overrides=["model.name_or_path=gpt2", "rm.max_len=4096"])  # a hub model: known at load


def test_presets_say_which_stages_are_private():
    assert {k: v.private for k, v in presets("private").items()} == {"sft": True, "rm": True, "ppo": True}
    assert not any(v.private for v in presets("nonprivate").values())
    assert {k: v.private for k, v in presets("decoupled").items()} == {"sft": False, "rm": True, "ppo": False}
    assert "public" in presets("decoupled")["ppo"].reason
    assert {k: v.private for k, v in presets("ppo_only").items()} == {"sft": False, "rm": False, "ppo": True}
    assert "every user of D3 is protected" in presets("ppo_only")["ppo"].reason
    with pytest.raises(ValueError, match="preset"):
        presets("half")


DISJOINT = {"sft": ["a", "b"], "rm": ["c", "d", "e"], "ppo": ["f"]}
SHARED = {"sft": ["a", "b"], "rm": ["b", "c", "d"], "ppo": ["f"]}


def test_composition_follows_the_data_and_overlap_needs_shares():
    assert resolve_composition(PrivacyConfig(), DISJOINT) == "parallel"
    with pytest.raises(CompositionError, match="1 users appear in more than one private stage.*sft_share"):
        resolve_composition(PrivacyConfig(), SHARED)
    split = PrivacyConfig(sft_share=0.25, rm_share=0.25, ppo_share=0.5)
    assert resolve_composition(split, SHARED) == "sequential"
    # decoupled: only rm is private, so users shared with public stages do not force sequential composition
    assert resolve_composition(PrivacyConfig(preset="decoupled"), SHARED) == "parallel"
    assert resolve_composition(PrivacyConfig(preset="ppo_only"), SHARED) == "parallel"
    with pytest.raises(CompositionError, match="rm_share is 0"):
        resolve_composition(PrivacyConfig(sft_share=0.5, rm_share=0.0, ppo_share=0.5), SHARED)


def test_deltas_and_targets():
    cfg = PrivacyConfig(target_epsilon=4.0)
    run_delta, deltas = resolve_deltas(
        cfg, mode="parallel", stage_num_users={"sft": 100, "rm": 200, "ppo": 50}, union_num_users=350
    )
    # default: min(0.1/N, 1/(N ln N)) -- well below 1/N; for N <= e^10 that is 0.1/N
    assert deltas == pytest.approx({"sft": 0.001, "rm": 0.0005, "ppo": 0.002}) and run_delta == pytest.approx(0.002)
    assert default_delta(100_000) == pytest.approx(1 / (100_000 * math.log(100_000)))
    assert all(default_delta(n) <= 0.1 / n and default_delta(n) <= 1 / (n * math.log(n))
               for n in (2, 50, 1200, 25_000, 10**6))
    wu = PrivacyConfig(target_epsilon=4.0, delta=1 / 200)  # Wu et al.'s delta = 1/N is still available
    assert resolve_deltas(wu, mode="parallel", stage_num_users={"sft": 200, "rm": 200, "ppo": 200},
                          union_num_users=600)[0] == pytest.approx(1 / 200)
    assert stage_targets(cfg, mode="parallel") == {"sft": 4.0, "rm": 4.0, "ppo": 4.0}
    seq = PrivacyConfig(target_epsilon=4.0, sft_share=0.25, rm_share=0.25, ppo_share=0.5)
    run_delta, deltas = resolve_deltas(
        seq, mode="sequential", stage_num_users={"sft": 100, "rm": 200, "ppo": 50}, union_num_users=200
    )
    assert run_delta == pytest.approx(0.1 / 200)
    assert deltas == pytest.approx({"sft": 0.1 / 800, "rm": 0.1 / 800, "ppo": 0.1 / 400})
    assert stage_targets(seq, mode="sequential") == pytest.approx({"sft": 1.0, "rm": 1.0, "ppo": 2.0})


def test_sampling_rate_and_steps_from_public_constants():
    sft = SFTConfig(expected_batch_users=32, epochs=2.0)
    assert sft.sampling_rate(320) == pytest.approx(0.1)
    assert sft.num_steps(320) == 20
    with pytest.raises(ValueError, match="exceeds the stage's 10 users"):
        sft.sampling_rate(10)


def test_adaptive_clipping_needs_rdp():
    with pytest.raises(ConfigError, match="accountant=rdp"):
        check_pipeline(PrivacyConfig(), EngineConfig(policy="adaptive"))
    check_pipeline(PrivacyConfig(accountant="rdp"), EngineConfig(policy="adaptive"))
    check_pipeline(PrivacyConfig(preset="nonprivate"), EngineConfig(policy="adaptive"))
