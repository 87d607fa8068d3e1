"""Mutation suite for the privacy core: break one privacy-critical line at a time and check a fast test notices.

    python tools/mutate.py            # all mutations (make mutate); exit 1 if any survives
    python tools/mutate.py --list     # the mutations and the tests named to kill them
    python tools/mutate.py --only raw_clip_counts,ppo_same_noise_every_epoch [--json]

Why a curated list and not mutmut or cosmic-ray: those mutate every operator of every line and would spend hours
on this suite (a few minutes of tests times thousands of mutants), and most of their survivors are lines where
privacy does not depend on the change. The bugs that matter here are specific and semantic -- the same noise
every PPO epoch, a raw count accounted as a centred one, a sampler whose rate differs from the ledger's q -- and a
generic tool would not write them. Each mutation below is one such bug, applied to a temporary copy of the tree
(``git ls-files``, so the working tree is never touched), and names the fast default tests that must kill it.

A mutation is KILLED when those tests fail (pytest exit 1) on the mutated copy; SURVIVED when they pass; ERROR when
pytest could not run them (exit >= 2: the mutation broke an import, or a named test does not exist). The unmutated
copy must pass the same tests first, so a kill is the mutation's doing. Every row prints the seconds it took
(``--jobs`` mutations run side by side, each in its own copy: 2 by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One privacy bug: ``edits`` are (file, exact text, replacement); the text must occur exactly once."""

    name: str
    why: str
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]


ENGINE = "trainers/engine/engine.py"
PER_USER = "trainers/engine/per_user.py"
LEDGER = "accounting/ledger.py"
T_PRIV = "tests/engine/test_engine_privacy.py"
T_SOUND = "tests/engine/test_engine_soundness.py"
T_FAST = "tests/engine/test_engine_fast_path.py"
T_LEDGER = "tests/accounting/test_acct_ledger.py"
T_LEARN = "tests/stages/test_stage_learners.py"
T_STUDY = "tests/launch/test_study.py"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "ppo_same_noise_every_epoch",
        "every release of a reused sample (PPO epochs) draws the same noise",
        (("trainers/engine/sampling.py", 'stream = kind if release == 0 else f"{kind}/{release}"', "stream = kind"),),
        (f"{T_PRIV}::test_every_release_of_a_reused_sample_draws_independent_noise",),
    ),
    Mutation(
        "count_noise_removed",
        "adaptive clipping's clip counts are released without noise",
        ((ENGINE, "noisy = centred.cpu().double() + noise + self.count_offset()",
          "noisy = centred.cpu().double() + 0.0 * noise + self.count_offset()"),),
        (f"{T_PRIV}::test_clip_count_noise_is_gaussian_with_the_planned_std",),
    ),
    Mutation(
        "count_sensitivity_one_in_accounting",
        "the accountant charges the centred counts at sensitivity 1 (their sigma_eff formula changed)",
        (("accounting/mechanisms.py",
          "return (grad_noise_multiplier**-2 + num_counts * (2.0 * count_noise_std) ** -2) ** -0.5",
          "return (grad_noise_multiplier**-2 + num_counts * (1.0 * count_noise_std) ** -2) ** -0.5"),),
        ("tests/accounting/test_acct_calibration.py::test_clip_count_cost_is_a_group_of_sensitivity_one_half",),
    ),
    Mutation(
        "raw_clip_counts",
        "raw counts (sensitivity 1) released while accounted as centred (1/2): dpalign's bug at 0c7f519",
        ((ENGINE, "return counts - 0.5 * num_users", "return counts"),),
        (f"{T_SOUND}::test_adding_one_user_moves_every_release_by_at_most_its_accounted_sensitivity",),
    ),
    Mutation(
        "noise_std_divided_by_sqrt_k",
        "the gradient noise std is divided by sqrt(2) (a sqrt(K) mix-up)",
        ((ENGINE, "s += (std * noise).to(s.device)", "s += (std / math.sqrt(2) * noise).to(s.device)"),),
        (f"{T_PRIV}::test_noise_std_per_group_is_right_and_fresh_every_step",),
    ),
    Mutation(
        "normalize_by_realized_batch",
        "the noisy sum is divided by the realized (private) number of users instead of the public q*N",
        ((ENGINE, "        b = self.expected_batch_size\n        grads = [s / b for s in sums]",
          "        b = max(1.0, float(per_user[0].shape[0]))\n        grads = [s / b for s in sums]"),),
        ("tests/engine/test_engine_grads.py",),
    ),
    Mutation(
        "clip_over_one_tensor_of_a_group",
        "a group (LoRA A and B) is clipped by the norm of its first tensor only",
        ((ENGINE, "sq = sum(sq_norms(per_user[i]) for i in members)  # [U]",
          "sq = sq_norms(per_user[members[0]])  # [U]"),),
        (f"{T_SOUND}::test_adding_one_user_moves_every_release_by_at_most_its_accounted_sensitivity",),
    ),
    Mutation(
        "ghost_norm_drops_cross_token_terms",
        "ghost norms sum each token's ||x|| ||g|| squared and drop the pairs of a user's tokens and records",
        ((PER_USER, "return (torch.bmm(xp, xp.transpose(1, 2)) * torch.bmm(gp, gp.transpose(1, 2))).sum((1, 2))  # [U]",
          "return (torch.bmm(xp, xp.transpose(1, 2)) * torch.bmm(gp, gp.transpose(1, 2)))"
          ".diagonal(dim1=1, dim2=2).sum(1)  # [U]"),),
        (f"{T_FAST}::test_fast_release_equals_reference_release_for_users_with_several_records",),
    ),
    Mutation(
        "ghost_clipped_sum_unscaled",
        "the book-kept clipped sum of a ghost tensor ignores the users' clip factors (clipping disabled)",
        ((PER_USER, "w = scales.to(g.device, torch.float32)[rows].reshape(-1, *([1] * (g.dim() - 1)))  # [n, 1, ...]",
          "w = torch.ones_like(scales.to(g.device, torch.float32)[rows]).reshape(-1, *([1] * (g.dim() - 1)))"),),
        (f"{T_FAST}::test_fast_release_equals_reference_release_for_users_with_several_records",),
    ),
    Mutation(
        "event_q_halved",
        "the ledger event carries q/2 while the sampler uses q",
        ((ENGINE, "            sampling_rate=self.sampling_rate,\n            noise_multiplier=sigma_eff,",
          "            sampling_rate=self.sampling_rate / 2,\n            noise_multiplier=sigma_eff,"),),
        (f"{T_PRIV}::test_fixed_and_per_layer_events_match_steps",),
    ),
    Mutation(
        "event_repeats_one",
        "K releases of one sample recorded with repeats=1",
        ((ENGINE, "            noise_multiplier=sigma_eff,\n            repeats=repeats,",
          "            noise_multiplier=sigma_eff,\n            repeats=1,"),),
        (f"{T_PRIV}::test_sample_reuse_is_one_event_with_repeats_and_fresh_noise",),
    ),
    Mutation(
        "event_after_update",
        "the ledger event is written after the update is applied (not write-ahead)",
        ((ENGINE, "            self.event_sink(event)  # write-ahead: durable before anything is released",
          "            self._late_event = event"),
         (ENGINE, "        self.apply_fn(grads)\n",
          "        self.apply_fn(grads)\n        if getattr(self, '_late_event', None) is not None:\n"
          "            self.event_sink(self._late_event)\n            self._late_event = None\n")),
        (f"{T_PRIV}::test_event_is_durable_before_the_update_is_applied_and_a_failing_sink_applies_nothing",),
    ),
    Mutation(
        "stage_epsilon_vs_run_target",
        "a stage's epsilon is compared with the run's target instead of the stage's own",
        ((LEDGER, "if stage_eps > header.target_epsilon:", "if stage_eps > run.target_epsilon:"),),
        (f"{T_LEDGER}::test_stage_target_below_run_target_refuses_at_the_stage_target",),
    ),
    Mutation(
        "sequential_filter_sees_one_stage",
        "under sequential composition the filter looks only at the proposing stage",
        ((LEDGER, "overall_eps = self._epsilon_with(None, run.target_delta, event, copies)",
          "overall_eps = stage_eps"),),
        (f"{T_LEDGER}::test_sequential_run_budget_alone_refuses_a_stage_within_its_own_target",),
    ),
    Mutation(
        "filter_admits_one_extra_step",
        "the RDP filter scores the ledger without the proposal (admits one step too many)",
        ((LEDGER, "return self._score(event, 1, header)", "return self._score(event, 0, header)"),),
        (f"{T_LEDGER}::test_stage_target_below_run_target_refuses_at_the_stage_target",),
    ),
    Mutation(
        "recorded_steps_off_by_one",
        "a resumed stage restarts one step before the ledger's count (a recorded step is taken again)",
        (("trainers/stages/learner.py", "return max(int(restored_step), int(recorded_steps))",
          "return max(int(restored_step), int(recorded_steps) - 1)"),),
        ("tests/stages/test_stage_resume.py::test_resume_step_never_retakes_a_recorded_step",
         f"{T_LEARN}::test_in_process_crash_between_event_and_checkpoint_loses_that_step_and_never_retakes_it"),
    ),
    Mutation(
        "sft_sampler_rate_doubled",
        "DP-SFT samples users at 2q while its ledger events say q",
        (("trainers/stages/sft.py", "PoissonUserSampler(users.num_users, sampling_rate=plan.q, seed=noise)",
          "PoissonUserSampler(users.num_users, sampling_rate=min(1.0, 2 * plan.q), seed=noise)"),),
        (f"{T_LEARN}::test_samples_are_poisson_at_the_ledger_rate",),
    ),
    Mutation(
        "ppo_sampler_rate_doubled",
        "DP-PPO samples users at 2q while its ledger events say q",
        (("trainers/stages/ppo.py", "PoissonUserSampler(users.num_users, sampling_rate=plan.q, seed=noise)",
          "PoissonUserSampler(users.num_users, sampling_rate=min(1.0, 2 * plan.q), seed=noise)"),),
        ("tests/stages/test_stage_ppo.py::test_ppo_samples_are_poisson_at_the_ledger_rate",),
    ),
    Mutation(
        "poisson_replaced_by_shuffle",
        "fixed-size batches (round(qN) users) accounted as Poisson(q)",
        (("trainers/engine/sampling.py", "return torch.nonzero(draws < self.sampling_rate).flatten()  # [n_sampled]",
          "return torch.sort(torch.argsort(draws)[: max(1, round(self.expected_batch_size))]).values"),),
        (f"{T_PRIV}::test_poisson_inclusion_frequency_matches_q",),
    ),
    Mutation(
        "shared_noise_times_world_size",
        "the noise every rank adds to the all-reduced sum is multiplied by the world size",
        ((ENGINE, "s += (std * noise).to(s.device)",
          "s += (std * (__import__('torch').distributed.get_world_size() if self.reduce_fn is not None else 1)"
          " * noise).to(s.device)"),),
        ("tests/distributed/test_dist_ray.py::test_two_gloo_learners_equal_single_process_and_ledger_is_write_ahead",),
    ),
    Mutation(
        "secret_seed_replaced_by_config_seed",
        "the stages key their noise and samples by the public config seed",
        (("trainers/stages/learner.py", "    if reproducible_noise(ctx.cfg) or not ctx.private:", "    if True:"),),
        (f"{T_LEARN}::test_default_secret_noise_two_runs_of_one_config_release_different_adapters",),
    ),
    Mutation(
        "engine_secret_replaced_by_public_seed",
        "an engine built without a key uses the public seed 0 instead of drawing a secret",
        ((ENGINE, "self.seed = NoiseSeed.draw() if seed is None else NoiseSeed.of(seed)",
          "self.seed = NoiseSeed.of(0) if seed is None else NoiseSeed.of(seed)"),),
        (f"{T_SOUND}::test_default_engine_draws_a_secret_and_refuses_one_per_rank",),
    ),
    Mutation(
        "policy_observes_pre_noise_norms",
        "the policy's (controller's) observed norms are computed from the clipped sums before the noise",
        ((ENGINE, "        gen = release_generator(self.seed, step, kind=\"noise\", release=release)\n",
          "        raw = tuple(float(torch.sqrt(sum(sums[i].double().pow(2).sum() for i in m))) / self.expected_batch_size"
          " for m in self.group_members)\n"
          "        gen = release_generator(self.seed, step, kind=\"noise\", release=release)\n"),
         (ENGINE, "            noisy_grad_norms=tuple(\n"
          "                float(torch.sqrt(sum(g.double().pow(2).sum() for g in gs))) for gs in group_grads\n"
          "            ),\n", "            noisy_grad_norms=raw,\n")),
        (f"{T_PRIV}::test_what_a_policy_observes_is_the_noisy_release_itself",),
    ),
    Mutation(
        "controller_sigma_below_the_floor",
        "the learned controller's budget guard passes a proposal below the floor that affords the remaining steps",
        (("controller/budget.py", "        s = min(max(s, floor), self.max_noise_multiplier)\n",
          "        s = min(max(s, 0.5 * floor), self.max_noise_multiplier)\n"),),
        ("tests/controller/test_ctrl_budget.py::test_adversarial_proposals_never_exceed_target",),
    ),
    Mutation(
        "tuning_mean_ignored",
        "a repeat-and-select study ledger is accounted as if one trial ran (E[K] = 1), whatever its law of K",
        (("accounting/ledger_file.py", 'mean_trials=params["mean_trials"],', "mean_trials=1.0,"),),
        (f"{T_STUDY}::test_repeat_and_select_epsilon_is_dp_accountings_repeat_and_select_over_the_trials",),
    ),
    Mutation(
        "tuning_bound_below_the_filter",
        "the per-trial RDP bound of a repeat-and-select study is taken below what the trials' filter admits",
        (("launch/study.py", "bound = trial_rdp_bound(target_epsilon=trial_target,",
          "bound = trial_rdp_bound(target_epsilon=0.5 * trial_target,"),),
        (f"{T_STUDY}::test_repeat_and_select_epsilon_is_dp_accountings_repeat_and_select_over_the_trials",),
    ),
)


def copy_tree(dest: Path) -> None:
    """The working tree's files (tracked and untracked, not ignored) copied into ``dest``."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(tree: Path, mutation: Mutation) -> None:
    for rel, old, new in mutation.edits:
        path = tree / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{mutation.name}: {rel} has {text.count(old)} copies of the text to mutate (need 1); "
                             "update tools/mutate.py to the code")
        path.write_text(text.replace(old, new))


def run_tests(tree: Path, tests: tuple[str, ...], *, timeout: int) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                             cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, time.monotonic() - t0, "timeout"
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    failed = [ln.split(" - ")[0].removeprefix("FAILED ") for ln in lines if ln.startswith("FAILED ")]
    if out.returncode == 1 and failed:
        return 1, time.monotonic() - t0, ", ".join(failed)
    return out.returncode, time.monotonic() - t0, lines[-1] if lines else out.stderr[-300:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the mutations and their killing tests, run nothing")
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--json", action="store_true", help="print one JSON object after the table")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    ap.add_argument("--jobs", type=int, default=2,
                    help="mutations tested at once, each in its own copy (default 2: one per core of the CI machine)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {m.name for m in MUTATIONS}
    if unknown:
        ap.error(f"unknown mutations {sorted(unknown)}; see --list")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.why}\n    killed by: {', '.join(m.tests)}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpalign-mutate-") as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        rc, secs, summary = run_tests(clean, tests, timeout=args.timeout * 2)
        print(f"unmutated copy: {summary} ({secs:.0f} s)", flush=True)
        if rc != 0:
            print("the unmutated tree must pass the killing tests first", file=sys.stderr)
            return 2

        def test_one(m: Mutation) -> dict:
            tree = Path(tmp) / m.name
            shutil.copytree(clean, tree)
            apply(tree, m)
            rc, secs, summary = run_tests(tree, m.tests, timeout=args.timeout)
            shutil.rmtree(tree, ignore_errors=True)
            verdict = "killed" if rc == 1 else ("SURVIVED" if rc == 0 else "ERROR")
            print(f"{m.name:<38} {verdict:<9} {secs:6.1f} s  {summary}", flush=True)
            return {"mutation": m.name, "verdict": verdict, "killed_by": summary, "seconds": round(secs, 1)}

        # Each mutation has its own copy and pytest process, so they run side by side; rows print as they finish.
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            rows = list(pool.map(test_one, chosen))
    survived = [r["mutation"] for r in rows if r["verdict"] != "killed"]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations killed"
          + (f"; not killed: {', '.join(survived)}" if survived else ""))
    if args.json:
        print(json.dumps({"mutations": rows, "survived": survived}))
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
