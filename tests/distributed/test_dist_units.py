"""Fast checks of the distributed building blocks: configs, seeds, Poisson sample sharding, the all-reduce on a
one-rank gloo group, DeepSpeed's JSON config, address resolution, and the shipped cluster YAML files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import dpalign
from cluster.config import DeepSpeedConfig, RayConfig
from cluster.runtime import resolve_address
from launch.config import ConfigError, load_config
from trainers.distributed import (
    build_deepspeed_config,
    param_shape,
    poisson_sample,
    shard_users,
)
from trainers.engine.sampling import step_seed

CONFIGS = Path(__file__).resolve().parents[2] / "cluster" / "configs"


@pytest.mark.parametrize(
    ("cls", "override", "field"),
    [
        (RayConfig, "num_workers=-1", "ray.num_workers"),
        (RayConfig, "max_failures=-2", "ray.max_failures"),
        (RayConfig, "address=nowhere", "ray.address"),
        (RayConfig, "resources_per_worker={GPU: 1}", "ray.resources_per_worker.GPU"),
        (RayConfig, "resources_per_worker={TPU: -1}", "ray.resources_per_worker.TPU"),
        (DeepSpeedConfig, "zero_stage=4", "zero_stage"),
        (DeepSpeedConfig, "offload_param=true", "deepspeed.offload_param"),
        (DeepSpeedConfig, "bf16=true", None),
    ],
)
def test_configs_reject_bad_values_naming_the_field(cls, override, field):
    if field is None:  # bf16 alone is valid; with fp16 it is not
        load_config(cls, overrides=[override])
        with pytest.raises(ConfigError, match="deepspeed.bf16"):
            load_config(cls, overrides=[override, "fp16=true"])
        return
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(cls, overrides=[override])


def test_config_defaults_are_valid_and_documented():
    from launch.config import field_docs

    for cls in (RayConfig, DeepSpeedConfig):
        load_config(cls)
        assert set(field_docs(cls)) == set(cls.__dataclass_fields__), cls.__name__


def test_step_seed_is_deterministic_and_separates_streams():
    assert step_seed(1, 2, "noise") == step_seed(1, 2, "noise")
    seeds = {step_seed(s, t, k) for s in range(3) for t in range(50) for k in ("noise", "poisson")}
    assert len(seeds) == 3 * 50 * 2
    with pytest.raises(ValueError, match="seed"):
        step_seed(-1, 0, "noise")


def test_shards_of_one_poisson_sample_are_disjoint_and_cover_it():
    sampled = poisson_sample(1000, sampling_rate=0.1, seed=0, step=5)
    assert torch.equal(sampled, poisson_sample(1000, sampling_rate=0.1, seed=0, step=5))
    assert not torch.equal(sampled, poisson_sample(1000, sampling_rate=0.1, seed=0, step=6))
    for world in (1, 2, 3, 7):
        shards = [shard_users(sampled, rank=r, world_size=world) for r in range(world)]
        assert torch.equal(torch.cat(shards), sampled)
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
    assert len(shard_users(torch.tensor([4]), rank=1, world_size=2)) == 0  # a rank may get no user
    with pytest.raises(ValueError, match="rank=2"):
        shard_users(sampled, rank=2, world_size=2)


def test_poisson_inclusion_rate_matches_q():
    from scipy.stats import binomtest

    q, n, steps = 0.05, 400, 50
    hits = sum(len(poisson_sample(n, sampling_rate=q, seed=11, step=t)) for t in range(steps))
    assert binomtest(hits, n * steps, q).pvalue > 1e-3


def test_allreduce_on_one_rank_and_refusal_without_process_group(tmp_path):
    import torch.distributed as dist

    from trainers.distributed import allreduce_sum_fn, assert_replicated

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialized"):
        allreduce_sum_fn()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        reduce = allreduce_sum_fn()
        xs = [torch.ones(3), torch.arange(4.0).reshape(2, 2)]
        reduce(xs)
        assert torch.equal(xs[1], torch.arange(4.0).reshape(2, 2))
        assert_replicated(xs)
    finally:
        dist.destroy_process_group()


def test_deepspeed_json_config_for_each_stage():
    for stage in (0, 1, 2, 3):
        ds = build_deepspeed_config(DeepSpeedConfig(enabled=True, zero_stage=stage), device="cpu")
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.0
        assert not ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
        json.dumps(ds)
    z3 = build_deepspeed_config(DeepSpeedConfig(zero_stage=3, offload_param=True), device="cpu")
    assert z3["zero_optimization"]["stage3_param_persistence_threshold"] >= 1_000_000
    assert z3["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="deepspeed.fp16"):
        build_deepspeed_config(DeepSpeedConfig(fp16=True), device="cpu")
    assert build_deepspeed_config(DeepSpeedConfig(bf16=True), device="cuda")["bf16"]["enabled"]


def test_param_shape_reads_zero3_full_shape():
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_shape = torch.Size([4, 32])
    assert param_shape(p) == torch.Size([4, 32])
    assert param_shape(torch.nn.Parameter(torch.zeros(2, 3))) == torch.Size([2, 3])


def test_init_deepspeed_without_process_group_says_how_to_start_one(monkeypatch):
    from trainers.distributed import init_deepspeed

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="RANK"):
        init_deepspeed(model, lambda ps: torch.optim.SGD(ps, lr=0.1), DeepSpeedConfig(), device="cpu")


def test_address_resolution(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None and resolve_address("") is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address(None) == "10.0.0.1:6379"  # what `ray job submit` sets
    assert resolve_address("auto") == "auto"
    assert resolve_address("local") is None


def test_ray_cluster_launcher_yaml_follows_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CONFIGS / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def _overrides_are_valid_run_config(overrides: list[str]) -> Any:
    from launch.schema import RunConfig

    return load_config(RunConfig, overrides=overrides)


def test_kuberay_rayjob_runs_the_pinned_image_with_everything_on_the_shared_volume():
    """What was checked (KubeRay's CRD OpenAPI schema is not in the package registries here): the RayJob's
    structure, that every entrypoint override is a valid dpalign config, that the cache, the run directory and
    Ray Train's storage are under the volume every pod mounts, and that the image is the one cluster/Dockerfile
    builds from this version's wheel (no placeholder install URL)."""
    job = yaml.safe_load((CONFIGS / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    words = spec["entrypoint"].split()
    assert words[:3] == ["dpalign", "run", "--config"]
    cfg = _overrides_are_valid_run_config(words[4:])
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"env_vars"}, "the code comes from the image, not from a URL"
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    version = dpalign.__version__  # pyproject.toml reads it from there
    dockerfile = (CONFIGS.parent / "Dockerfile").read_text()
    assert f"dpalign-{version}-py3-none-any.whl" in dockerfile and "COPY launch/configs /opt/dpalign/configs" in dockerfile
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"].endswith(f"/dpalign:{version}-gpu")
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        shared = mounts[next(n for n, c in claims.items() if c == "dpalign-shared")]
        for field, path in (("run.cache_dir", cfg.run.cache_dir), ("run.out_dir", cfg.run.out_dir),
                            ("ray.storage_path", cfg.ray.storage_path)):
            assert Path(path).is_relative_to(shared), (field, path, shared)


def test_ray_cluster_launcher_installs_this_versions_wheel_and_mounts_shared_storage():
    config = yaml.safe_load((CONFIGS / "ray-cluster.yaml").read_text())
    version = dpalign.__version__  # pyproject.toml reads it from there
    (target,) = [t for t, src in config["file_mounts"].items() if src == "./dist"]
    setup = " && ".join(config["setup_commands"])
    assert f"{target}/dpalign-{version}-py3-none-any.whl" in setup and "git+" not in setup
    assert "mount -t nfs4" in setup and " /data" in setup
    header = (CONFIGS / "ray-cluster.yaml").read_text().split("cluster_name:")[0]
    submitted = header.split("python -m launch.cli run", 1)[1].replace("#", " ").replace("\\", " ").split()
    cfg = _overrides_are_valid_run_config([w for w in submitted if "=" in w])
    for path in (cfg.run.cache_dir, cfg.run.out_dir, cfg.ray.storage_path):
        assert path.startswith("/data/"), path
