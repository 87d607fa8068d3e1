"""The task build: user split, preference labels, canaries, cache behaviour."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from launch.config import ConfigError, load_config
from launch.schema import RunConfig
from trainers.data.config import DataConfig
from trainers.data.io import load_preferences, load_prompts, load_public, load_sft, user_ids
from trainers.data.oracle import gold_reward
from trainers.data.task import (
    CANARY_PREFIX,
    build_task,
    generate_task,
    plant_canaries,
    preference_probability,
    split_prompt,
    task_dir,
)

SMALL = DataConfig(public_reviews=60, num_users=60, eval_prompts=5, catalogue_size=50, max_records_per_user=2)


def _ids(rows):
    return {r["user_id"] for r in rows}


def test_stages_are_user_disjoint_by_default():
    data = generate_task(SMALL)
    sft, rm, ppo = _ids(data["sft"]), _ids(data["rm"]), _ids(data["ppo"])
    assert sft and rm and ppo
    assert not (sft & rm) and not (sft & ppo) and not (rm & ppo)
    assert len(sft | rm | ppo) == SMALL.num_users
    assert all(r["user_id"] for r in data["sft"] + data["rm"] + data["ppo"])
    # records per user within [min, max]
    per_user: dict[str, int] = {}
    for r in data["sft"]:
        per_user[r["user_id"]] = per_user.get(r["user_id"], 0) + 1
    assert set(per_user.values()) <= {1, 2}


def test_shared_users_appear_in_all_three_stages_exactly():
    data = generate_task(replace(SMALL, shared_users=4))
    sft, rm, ppo = _ids(data["sft"]), _ids(data["rm"]), _ids(data["ppo"])
    assert len(sft & rm & ppo) == 4
    assert (sft & rm) == (sft & ppo) == (rm & ppo) == set(data["split"]["shared"])


def test_prompts_are_review_openings_and_responses_continue_them():
    rng = random.Random(0)
    text = "I watched The Blue Harbor last weekend with my brother. It was wonderful."
    prompt, response = split_prompt(
        text, rng, first_sentence=text.split(". ")[0] + ".", min_words=4, max_words=8
    )
    assert prompt + response == text and response.startswith(" ") and 4 <= len(prompt.split()) <= 8
    data = generate_task(SMALL)
    for row in data["sft"]:
        assert 1 <= len(row["prompt"].split()) <= SMALL.prompt_max_words and row["response"].startswith(" ")
    for row in data["rm"]:
        assert row["chosen"] != row["rejected"] and row["chosen"].startswith(" ")


def test_preference_labels_follow_the_oracle_and_the_temperature():
    assert preference_probability(0.5, -0.5, temperature=0.1) == pytest.approx(1 / (1 + math.exp(-10)))
    assert preference_probability(0.0, 0.0, temperature=0.3) == 0.5

    def agreement(temperature: float) -> float:
        cfg = replace(SMALL, num_users=200, rm_user_fraction=0.55, preference_temperature=temperature)
        rows = generate_task(cfg)["rm"]
        chosen, rejected = gold_reward(r["chosen"] for r in rows), gold_reward(r["rejected"] for r in rows)
        decided = [(c, r) for c, r in zip(chosen, rejected, strict=True) if abs(c - r) > 1e-9]
        return sum(c > r for c, r in decided) / len(decided)

    sharp, noisy = agreement(0.05), agreement(5.0)
    assert sharp > 0.9, sharp
    assert 0.4 < noisy < 0.7, noisy  # near chance when T dwarfs the reward range
    assert sharp > noisy + 0.2


def test_private_responses_are_mixed_sentiment():
    data = generate_task(replace(SMALL, num_users=150))
    rewards = gold_reward(r["response"] for r in data["sft"])
    pos = sum(r > 0.05 for r in rewards) / len(rewards)
    assert 0.3 < pos < 0.8, pos  # room for alignment toward positive


def test_canaries_are_planted_for_chosen_users():
    data = generate_task(replace(SMALL, canary_users=3))
    canaries = data["canaries"]
    assert len(canaries) == 3 and len({c.secret for c in canaries}) == 3
    sft_users = set(data["split"]["sft"])
    for c in canaries:
        assert c.user_id in sft_users and c.prompt == CANARY_PREFIX
        assert {"user_id": c.user_id, "prompt": CANARY_PREFIX, "response": " " + c.secret} in data["sft"]
        assert len(c.secret.split()) == 6 and all(d.isdigit() for d in c.secret.split())
    # The helper plants into any D1 rows, without modifying them, deterministically per (seed, user).
    rows = [{"user_id": "a", "prompt": "p", "response": " r"}]
    planted, planted_canaries = plant_canaries(rows, ["a", "new"], seed=7, digits=4)
    assert len(rows) == 1 and len(planted) == 3 and {r["user_id"] for r in planted} == {"a", "new"}
    assert plant_canaries(rows, ["a"], seed=7, digits=4)[1][0] == planted_canaries[0]


def test_build_writes_loadable_files_and_reuses_the_cache(tmp_path: Path):
    cfg = replace(SMALL, canary_users=2)
    first = build_task(cfg, cache_dir=tmp_path, progress=False)
    assert first.built and Path(first.root) == task_dir(cfg, cache_dir=tmp_path)
    manifest = json.loads((Path(first.root) / "manifest.json").read_text())
    assert manifest["hash"] == Path(first.root).name and manifest["config"]["num_users"] == SMALL.num_users
    assert manifest["counts"] == first.counts and len(manifest["canaries"]) == 2
    sft, rm, ppo = load_sft(first.sft), load_preferences(first.rm), load_prompts(first.ppo)
    assert (
        len(sft) == first.counts["sft"]
        and len(load_public(first.public_train)) == first.counts["public_train"]
    )
    assert not (user_ids(sft) & user_ids(rm)) and not (user_ids(rm) & user_ids(ppo))
    assert first.users["sft"] == len(user_ids(sft))

    mtime = (Path(first.root) / "sft.jsonl").stat().st_mtime_ns
    again = build_task(cfg, cache_dir=tmp_path, progress=False)
    assert not again.built and again.root == first.root and again.counts == first.counts
    assert (Path(first.root) / "sft.jsonl").stat().st_mtime_ns == mtime  # not rewritten
    assert again.canaries == first.canaries

    changed = build_task(replace(cfg, seed=1), cache_dir=tmp_path, progress=False)
    assert changed.built and changed.root != first.root
    assert Path(changed.sft).read_text() != Path(first.sft).read_text()
    # No temp directories left behind.
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if p.is_dir()) == sorted(
        [Path(first.root).name, Path(changed.root).name]
    )


def test_a_half_written_cache_directory_is_rebuilt(tmp_path: Path):
    final = task_dir(SMALL, cache_dir=tmp_path)
    final.mkdir(parents=True)
    (final / "sft.jsonl").write_text("partial")
    task = build_task(SMALL, cache_dir=tmp_path, progress=False)
    assert (
        task.built and (final / "manifest.json").is_file() and len(load_sft(task.sft)) == task.counts["sft"]
    )


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.shared_users=58", "data.shared_users"),
        ("data.max_sentences=2", "data.max_sentences"),
        ("data.prompt_max_words=2", "data.prompt_max_words"),
        ("data.public_valid_fraction=0.6", "data.public_valid_fraction"),
        ("data.source=files", "data.sft_path"),
    ],
)
def test_data_config_errors_name_the_field(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(RunConfig, None, ["data.num_users=60", override])


def test_callers_that_miss_one_entry_at_once_build_it_once(tmp_path: Path, monkeypatch):
    """Concurrent Tune trials (or workers) on one node that need the same missing task: one generates it, the
    others wait for its build lock and read it (dpalign.cache.build_lock), instead of each generating a copy."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import trainers.data.task as task_module

    generated, real = [], task_module.generate_task

    def slow_generate(cfg, **kw):
        generated.append(threading.get_ident())
        time.sleep(0.5)  # every caller has checked the cache before the first build ends
        return real(cfg, **kw)

    monkeypatch.setattr(task_module, "generate_task", slow_generate)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda _: build_task(SMALL, cache_dir=tmp_path, progress=False), range(3)))
    assert len(generated) == 1
    assert sorted(t.built for t in got) == [False, False, True] and len({t.root for t in got}) == 1
