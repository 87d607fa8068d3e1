"""Two gloo learners in Ray Train give the single-process DP update; DeepSpeed ZeRO-2/3 apply it exactly.

The session's one Ray (tests/conftest.py); the worker loops are pickled by value, so workers need no path setup. References are computed in the driver with one process and a plain torch optimizer.
"""

from __future__ import annotations

import functools
import tempfile
import traceback
from pathlib import Path

import dist_helpers as H
import pytest
import torch

from trainers.distributed import poisson_sample

SEED = 3
STEPS = 2
NOISE = 1.0


def _optimizer(noise: float):
    """AdamW without noise (optimizer state partitioned by ZeRO), SGD with momentum with noise: SGD is linear in
    the gradient, so a wrongly scaled gradient (e.g. a missed average over ranks) cannot hide behind Adam's
    scale invariance."""
    if noise == 0.0:
        return lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, weight_decay=0.01)
    return lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9)


@pytest.fixture(scope="module")
def ray_session(ray_module, tmp_path_factory):
    """The session's Ray with dist_helpers pickled by value too (the worker loops call it); yields the storage
    directory of this module's Ray Train runs."""
    ray_module.cloudpickle.register_pickle_by_value(H)
    yield tmp_path_factory.mktemp("ray_train")


def _dp_loop(config: dict) -> None:
    """Every rank runs the real DPEngine on its slice of the same Poisson sample with reduce_fn = all-reduce;
    rank 0 emits each event to the driver's ledger, and checks it is on disk before the update is applied."""
    import ray.train

    from accounting.ledger import read_ledger
    from cluster.train import worker_info
    from trainers.distributed import assert_replicated, poisson_sample, shard_users
    from trainers.stages.ray_learner import engine_hooks

    torch.set_num_threads(1)
    info = worker_info()
    model = H.tiny_lora_gpt2()
    records = H.user_records()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    ledger = Path(config["ledger"])
    applied = []

    def apply(grads):
        assert_replicated(grads)
        if info.is_main_process:  # write-ahead: the event of this step is on the driver's disk already
            assert len(read_ledger(ledger).events) == len(applied) + 1
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        applied.append(1)

    engine = H.dp_engine(
        model,
        seed=SEED,
        noise_multiplier=NOISE,
        apply_fn=apply,
        optimizer=opt,
        **engine_hooks(config["sink"]),
    )
    local_users = 0
    for step in range(STEPS):
        sampled = poisson_sample(H.NUM_USERS, sampling_rate=H.SAMPLING_RATE, seed=SEED, step=step)
        mine = shard_users(sampled, rank=info.rank, world_size=info.world_size)
        local_users += len(mine)
        engine.step(H.user_batch(records, mine), H.lm_loss_fn(model))
    metrics = {"local_users": local_users, "rank": info.rank}
    if info.is_main_process:
        with tempfile.TemporaryDirectory() as d:
            torch.save([p.detach().clone() for p in params], Path(d) / "lora.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def _reference(optimizer_factory, noise: float, *, engine: bool = False) -> list[torch.Tensor]:
    """One process, all sampled users, plain torch optimizer; the real engine or the textbook computation."""
    from trainers.distributed import trainable_named_parameters

    model = H.tiny_lora_gpt2()
    records = H.user_records()
    params = [p for _, p in trainable_named_parameters(model)]
    opt = optimizer_factory(params)
    events = []
    dp = H.dp_engine(model, seed=SEED, noise_multiplier=noise, event_sink=events.append) if engine else None
    for step in range(STEPS):
        sampled = poisson_sample(H.NUM_USERS, sampling_rate=H.SAMPLING_RATE, seed=SEED, step=step)
        if dp is not None:
            dp.step(H.user_batch(records, sampled), H.lm_loss_fn(model))
        else:
            grads = H.dp_gradient(
                model,
                records,
                sampled,
                clip=H.CLIP,
                noise_multiplier=noise,
                seed=SEED,
                step=step,
                expected_batch_size=H.SAMPLING_RATE * H.NUM_USERS,
            )
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in params]


@pytest.mark.heavy(32)
def test_two_gloo_learners_equal_single_process_and_ledger_is_write_ahead(ray_session):
    from accounting.ledger import Ledger
    from cluster.ledger import start_ledger_sink, stop_ledger_sink
    from cluster.runtime import init_ray
    from cluster.train import run_learners

    assert init_ray().started_here is False  # idempotent: joins the session's Ray
    ledger = ray_session / "ledger.jsonl"
    open_ledger = functools.partial(
        Ledger.open, ledger, run_id="dist", target_epsilon=50.0, target_delta=1e-5
    )
    with open_ledger() as driver_ledger:  # the driver creates the run and the stage, then hands the file over
        driver_ledger.begin_stage("test", user_fingerprint="users16", num_users=H.NUM_USERS)
    sink = start_ledger_sink(open_ledger)
    try:
        result = run_learners(
            _dp_loop,
            {"sink": sink, "ledger": str(ledger)},
            num_workers=2,
            max_failures=0,
            storage_path=str(ray_session),
            name="dp2",
        )
    finally:
        stop_ledger_sink(sink)
    with result.checkpoint.as_directory() as d:
        got = torch.load(Path(d) / "lora.pt")
    sgd = lambda ps: torch.optim.SGD(ps, lr=1.0)  # noqa: E731
    want = _reference(sgd, NOISE, engine=True)
    textbook = _reference(sgd, NOISE)
    start = [p for p in H.tiny_lora_gpt2().parameters() if p.requires_grad]
    assert max((a - b).abs().max().item() for a, b in zip(want, start, strict=True)) > 1e-3, "must move"
    for a, b, c in zip(got, want, textbook, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # 2 ranks == 1 process (same engine, same seed)
        torch.testing.assert_close(b, c, rtol=0, atol=1e-6)  # the engine == per-user autograd by hand
    with (
        open_ledger() as driver_ledger
    ):  # back with the driver: one event per step, as the engine planned them
        events = driver_ledger.events("test")
    assert [e.step for e in events] == list(range(STEPS))
    for e in events:  # sigma_eff comes from the accounting helper (floating point), q is the configured rate
        assert e.noise_multiplier == pytest.approx(NOISE, rel=1e-9) and e.sampling_rate == H.SAMPLING_RATE


def _deepspeed_loop(config: dict) -> None:
    """Every rank: for ZeRO-2 and ZeRO-3, with and without noise, two DP steps through DeepSpeed's optimizer
    (per-user gradients computed through the DeepSpeed-wrapped module); rank 0 reports the LoRA weights."""
    import deepspeed
    import ray.train

    from cluster.config import DeepSpeedConfig
    from cluster.train import worker_info
    from trainers.distributed import (
        allreduce_sum_fn,
        deepspeed_apply_fn,
        gather_trainable_state,
        init_deepspeed,
        poisson_sample,
        shard_users,
    )

    torch.set_num_threads(1)
    info = worker_info()
    records = H.user_records()
    reduce = allreduce_sum_fn()
    out: dict[str, list[torch.Tensor]] = {}
    for stage in (2, 3):
        for noise in (0.0, NOISE):
            engine, _ = init_deepspeed(
                H.tiny_lora_gpt2(),
                _optimizer(noise),
                DeepSpeedConfig(enabled=True, zero_stage=stage),
                device="cpu",
            )
            apply = deepspeed_apply_fn(engine)
            for step in range(STEPS):
                sampled = poisson_sample(H.NUM_USERS, sampling_rate=H.SAMPLING_RATE, seed=SEED, step=step)
                mine = shard_users(sampled, rank=info.rank, world_size=info.world_size)
                grads = H.dp_gradient(
                    engine.module,
                    records,
                    mine,
                    clip=H.CLIP,
                    noise_multiplier=noise,
                    seed=SEED,
                    step=step,
                    expected_batch_size=H.SAMPLING_RATE * H.NUM_USERS,
                    reduce_fn=reduce,
                )
                apply(grads)
            out[f"z{stage}_noise{noise}"] = list(gather_trainable_state(engine).values())
            frozen = [p for p in engine.module.parameters() if not p.requires_grad]
            with deepspeed.zero.GatheredParameters(frozen, modifier_rank=None, enabled=stage == 3):
                out[f"z{stage}_noise{noise}_frozen"] = [p.detach().clone() for p in frozen]
    if info.is_main_process:
        with tempfile.TemporaryDirectory() as d:
            torch.save(out, Path(d) / "out.pt")
            ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({})


@pytest.mark.slow  # ~50 s on 2 cores: DeepSpeed import and four engine initializations per worker
def test_deepspeed_zero2_zero3_apply_the_dp_update_like_a_plain_optimizer(ray_session):
    from cluster.train import run_learners

    result = run_learners(_deepspeed_loop, {}, num_workers=2, storage_path=str(ray_session), name="ds2")
    with result.checkpoint.as_directory() as d:
        got = torch.load(Path(d) / "out.pt")
    frozen_start = [p.detach() for p in H.tiny_lora_gpt2().parameters() if not p.requires_grad]
    for noise in (0.0, NOISE):
        want = _reference(_optimizer(noise), noise)
        for stage in (2, 3):
            key = f"z{stage}_noise{noise}"
            for a, b in zip(got[key], want, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
            for a, b in zip(got[key + "_frozen"], frozen_start, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, k=key: f"{k} frozen: {m}")
    assert not torch.allclose(got["z2_noise0.0"][0], got[f"z2_noise{NOISE}"][0]), (
        "noise must change the update"
    )


def _engine_deepspeed_loop(config: dict) -> None:
    """The real DPEngine on a DeepSpeed-wrapped model (ZeRO 0, 2, 3; with and without noise), two ranks."""
    import ray.train

    from cluster.config import DeepSpeedConfig
    from cluster.train import worker_info
    from trainers.distributed import (
        allreduce_sum_fn,
        deepspeed_apply_fn,
        gather_trainable_state,
        init_deepspeed,
        poisson_sample,
        shard_users,
    )

    torch.set_num_threads(1)
    info = worker_info()
    records = H.user_records()
    out: dict[str, object] = {}
    for stage in (0, 2, 3):
        for noise in (0.0, NOISE):
            key = f"z{stage}_noise{noise}"
            ds, _ = init_deepspeed(
                H.tiny_lora_gpt2(),
                _optimizer(noise),
                DeepSpeedConfig(enabled=True, zero_stage=stage),
                device="cpu",
            )
            dp = H.dp_engine(
                ds.module,
                seed=SEED,
                noise_multiplier=noise,
                reduce_fn=allreduce_sum_fn(),
                apply_fn=deepspeed_apply_fn(ds),
                is_main_process=info.is_main_process,
                event_sink=(lambda e: None) if info.is_main_process else None,
            )
            try:
                for step in range(STEPS):
                    sampled = poisson_sample(H.NUM_USERS, sampling_rate=H.SAMPLING_RATE, seed=SEED, step=step)
                    mine = shard_users(sampled, rank=info.rank, world_size=info.world_size)
                    dp.step(H.user_batch(records, mine), H.lm_loss_fn(ds.module))
                out[key] = list(gather_trainable_state(ds).values())
            except Exception as err:  # recorded for the driver; a DeepSpeed engine in a bad state is dropped
                where = traceback.extract_tb(err.__traceback__)[-1].name
                out[key] = f"{type(err).__name__} in {where}: {err}"
            finally:
                dp.close()
    if info.is_main_process:
        with tempfile.TemporaryDirectory() as d:
            torch.save(out, Path(d) / "out.pt")
            ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({})


# The engine differentiates w.r.t. the hooked modules' outputs only (no parameter .grad), so DeepSpeed ZeRO-1/2/3's
# gradient-reduction hooks never see the unclipped gradient: every stage must equal the plain engine.


@pytest.mark.slow  # ~60 s on 2 cores
def test_engine_under_deepspeed_equals_plain_engine(ray_session):
    from cluster.train import run_learners

    result = run_learners(
        _engine_deepspeed_loop, {}, num_workers=2, storage_path=str(ray_session), name="eng_ds"
    )
    with result.checkpoint.as_directory() as d:
        got = torch.load(Path(d) / "out.pt")
    for noise in (0.0, NOISE):
        want = _reference(_optimizer(noise), noise, engine=True)
        for stage in (0, 2, 3):
            key = f"z{stage}_noise{noise}"
            assert not isinstance(got[key], str), f"{key} failed on the workers: {got[key]}"
            for a, b in zip(got[key], want, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def _restart_loop(config: dict) -> None:
    """Checkpoint after every step; on the first attempt rank 1 dies after step 0. The restarted group resumes as
    the stage recipes do (trainers.stages.learner.resume_step): at max(checkpoint's next step, the ledger's count,
    read by rank 0 from the sink actor and broadcast), never retaking a recorded step. Steps between the
    checkpoint and the count (recorded, their updates lost when Ray Train had not registered the checkpoint yet)
    are kept in the checkpoint as ``skipped``."""
    import ray.train

    from cluster.train import worker_info
    from trainers.distributed import poisson_sample, shard_users
    from trainers.stages.ray_learner import _ledger_count_on_every_rank, engine_hooks

    torch.set_num_threads(1)
    info = worker_info()
    model = H.tiny_lora_gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    restored, skipped = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt")
        with torch.no_grad():
            for p, v in zip(params, state["lora"], strict=True):
                p.copy_(v)
        restored, skipped = state["next_step"], list(state["skipped"])
    recorded = _ledger_count_on_every_rank(config["sink"], "test", rank=info.rank, world_size=info.world_size,
                                           device="cpu")
    start = max(restored, recorded)
    skipped += list(range(restored, start))
    opt = torch.optim.SGD(params, lr=1.0)  # stateless: the LoRA weights are the whole training state
    engine = H.dp_engine(
        model,
        seed=SEED,
        noise_multiplier=NOISE,
        optimizer=opt,
        start_step=start,
        **engine_hooks(config["sink"]),
    )
    records = H.user_records()
    for step in range(start, STEPS + 1):
        sampled = poisson_sample(H.NUM_USERS, sampling_rate=H.SAMPLING_RATE, seed=SEED, step=step)
        mine = shard_users(sampled, rank=info.rank, world_size=info.world_size)
        engine.step(H.user_batch(records, mine), H.lm_loss_fn(model))
        opt.step()
        opt.zero_grad()
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if info.is_main_process:
                torch.save(
                    {"lora": [p.detach().clone() for p in params], "next_step": step + 1, "skipped": skipped},
                    Path(d) / "state.pt",
                )
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"step": step}, checkpoint=checkpoint)
        crashed = Path(config["marker"])
        if step == 0 and info.rank == 1 and not crashed.exists():
            crashed.touch()
            raise RuntimeError("planted worker failure")


@pytest.mark.slow  # ~85 s on 2 busy cores: two worker-group start-ups
def test_learner_restart_resumes_from_checkpoint_without_rolling_back_the_ledger(ray_session):
    from accounting.ledger import Ledger
    from cluster.ledger import start_ledger_sink, stop_ledger_sink
    from cluster.train import run_learners

    ledger = ray_session / "restart.jsonl"
    open_ledger = functools.partial(
        Ledger.open, ledger, run_id="restart", target_epsilon=50.0, target_delta=1e-5
    )
    with open_ledger() as driver_ledger:
        driver_ledger.begin_stage("test", user_fingerprint="users16", num_users=H.NUM_USERS)
    sink = start_ledger_sink(open_ledger)
    marker = ray_session / "crashed-once"
    try:
        result = run_learners(
            _restart_loop,
            {"sink": sink, "marker": str(marker)},
            num_workers=2,
            max_failures=1,
            storage_path=str(ray_session),
            name="restart",
        )
    finally:
        stop_ledger_sink(sink)
    assert marker.exists(), "the planted failure must have happened"
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt")
    assert state["next_step"] == STEPS + 1
    # The weights are the reference run's with exactly the skipped steps' updates left out: none when Ray Train
    # had registered step 0's checkpoint before the failure, step 1 when rank 0 had recorded it first.
    assert set(state["skipped"]) <= set(range(1, STEPS + 1)), state["skipped"]
    want = _reference_steps(STEPS + 1, skipped=set(state["skipped"]))
    for a, b in zip(state["lora"], want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with open_ledger() as driver_ledger:
        steps = [e.step for e in driver_ledger.events("test")]
    # Every step taken is on the ledger once, in order: the restart resumes at the ledger's count, so a step rank 0
    # recorded before rank 1's failure stopped the group is never released again.
    assert steps == list(range(STEPS + 1)), steps


def _reference_steps(steps: int, *, skipped: set[int] = frozenset()) -> list[torch.Tensor]:
    """The single-process weights after ``steps`` steps, leaving out the updates of the ``skipped`` steps (their
    noise is seeded by step, so every later step's release is the same as in the restarted run)."""
    model = H.tiny_lora_gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    records = H.user_records()
    dp = None
    for step in range(steps):
        if step in skipped:
            dp = None
            continue
        if dp is None:  # a fresh engine at this step, as a restarted learner builds it
            dp = H.dp_engine(model, seed=SEED, noise_multiplier=NOISE, event_sink=lambda e: None, optimizer=opt,
                             start_step=step)
        sampled = poisson_sample(H.NUM_USERS, sampling_rate=H.SAMPLING_RATE, seed=SEED, step=step)
        dp.step(H.user_batch(records, sampled), H.lm_loss_fn(model))
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in params]
