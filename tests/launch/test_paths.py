"""Config paths are absolute before anything reaches a worker; outputs that would vanish with a Ray job are refused."""

from __future__ import annotations

from pathlib import Path

from launch.config import load_config
from launch.paths import check_outputs_outlive_the_job, resolve_config_paths
from launch.schema import RunConfig


def test_relative_paths_become_absolute_uris_and_hub_ids_stay(tmp_path):
    (tmp_path / "local-model").mkdir()
    cfg = load_config(RunConfig, None, [
        "run.out_dir=runs", "run.cache_dir=.cache/x", "ray.storage_path=s3://bucket/ray", "data.sft_path=d1.jsonl",
        "model.name_or_path=local-model",
    ])
    resolve_config_paths(cfg, base=tmp_path)
    assert cfg.run.out_dir == str(tmp_path / "runs") and cfg.run.cache_dir == str(tmp_path / ".cache" / "x")
    assert cfg.data.sft_path == str(tmp_path / "d1.jsonl") and cfg.data.rm_path == ""
    assert cfg.ray.storage_path == "s3://bucket/ray"
    assert cfg.model.name_or_path == str(tmp_path / "local-model")
    hub = load_config(RunConfig, None, ["model.name_or_path=gpt2"])
    assert resolve_config_paths(hub, base=tmp_path).model.name_or_path == "gpt2"  # not a local dir: a hub id


def test_output_inside_rays_working_dir_copy_is_refused(tmp_path):
    job_copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_copy.mkdir(parents=True)
    cfg = resolve_config_paths(load_config(RunConfig, None, []), base=job_copy)
    problem = check_outputs_outlive_the_job(cfg)
    assert problem is not None and "run.out_dir" in problem and "deletes" in problem
    kept = resolve_config_paths(load_config(RunConfig, None, [f"run.out_dir={tmp_path / 'runs'}"]), base=job_copy)
    assert check_outputs_outlive_the_job(kept) is None
    assert Path(kept.run.cache_dir).is_absolute()
