"""DP step overhead: the same LoRA training step non-private, with the dpalign engine, and with stock Opacus.

    python benchmarks/dp_overhead.py [--json] [--json-out PATH] [--sizes tiny,medium] [--settings attn1,all4]
                                     [--steps N] [--variants ...] [--secure-rng] [--batch B] [--seq T]

Settings (each run with every variant, all in the same invocation, so the ratios compare numbers of one run):
  * ``attn1``: LoRA r=4 on ``c_attn`` only, one record per user (the setting of earlier READMEs).
  * ``all4``: LoRA r=4 on every linear layer of GPT-2 (``c_attn, c_proj, c_fc``; ``c_proj`` names both the
    attention output and the MLP output projections), users with 4 records each (B/4 users) -- what users run.
Sizes: a GPT-2-architecture model, ``tiny`` = 4 layers, hidden 128, vocab 4096; ``medium`` = 12 layers, hidden 512,
vocab 4096; ``small`` = GPT-2 small (12 layers, hidden 768, vocab 50257: 124M parameters, built from config, for
GPUs). Batch ``--batch`` records (default 32) of ``--seq`` tokens (default 128), per-record causal LM loss, SGD.
Variants:
  * ``nonprivate``: ``loss.mean().backward(); opt.step()``.
  * ``engine``: ``DPEngine.step`` (per-user grads or norms, per-module clipping, isotropic noise, event) +
    ``opt.step()``, noise keyed by a fresh OS secret (the default of every run; torch's generator); the engine
    picks ghost norms or materialised per-user gradients per module (``per_user_mode="auto"``).
  * ``engine_ref``: the same engine forced to materialise every per-user gradient (``per_user_mode="materialize"``).
    For LoRA the ``auto`` rule already materialises every module (ghost norms cost more there, see
    ``trainers.engine.per_user``), so ``engine`` and ``engine_ref`` run the same code and differ by noise only.
  * ``engine_ghost`` (not in the default set): the engine forced to ghost norms for every Linear weight
    (``per_user_mode="ghost"``): what the ``auto`` rule avoids for LoRA.
  * ``engine_secure`` (``--secure-rng``): ``engine`` with ``privacy.secure_rng`` (noise from SHAKE-256).
  * ``opacus``: ``PrivacyEngine.make_private(grad_sample_mode="hooks")`` on the same peft model; flat clipping.
  * ``opacus_ghost``: ``make_private(grad_sample_mode="ghost")`` (Opacus' fast gradient / ghost clipping: two
    backward passes). Opacus has no user unit: with several records per user it clips each RECORD -- a weaker
    guarantee, timed only as a speed yardstick.

Time: median wall-clock ms per step over ``--steps`` steps after one warm-up step (perf_counter), and the
median process CPU time per step (``time.process_time``, all threads): on a machine shared with other jobs the
wall clock mostly measures the others, the CPU time much less so (compare ratios of the same column).
Memory: each (size, setting, variant) runs in a fresh subprocess (no allocator reuse or hooks leak across
variants). After building the model the process resets its peak-RSS counter (``/proc/self/clear_refs`` = 5) and
records the current RSS; after the steps it reads VmHWM. ``peak_rss_mb`` is the process peak during the steps;
``step_mem_mb`` = peak - RSS before the steps (activations, gradients, per-user buffers). On CUDA the same two
numbers come from ``torch.cuda.max_memory_allocated`` and ``memory_allocated``. Ratios are to non-private (``x``)
and to Opacus hooks (``/op``) of the same size and setting. On a shared machine timings are noisy: the run's load
average is printed and stored with them.

Allocator (``--malloc``): ``dpalign`` (default) runs every variant the way dpalign's processes run
(``dpalign.allocator.keep_freed_memory``: glibc keeps freed memory instead of unmapping it); ``default`` runs them
with glibc's default malloc, under the setting name ``<setting>+glibc``; ``both`` runs each setting both ways. Each
row also carries the minor page faults and the system CPU time per step, which is where the difference goes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import LoadAverage, emit  # noqa: E402  (benchmarks/ is the script directory)

SIZES = {
    "tiny": {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 4096},
    "medium": {"n_layer": 12, "n_embd": 512, "n_head": 8, "vocab_size": 4096},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
}
SETTINGS = {
    "attn1": {"targets": ("c_attn",), "records_per_user": 1},
    "all4": {"targets": ("c_attn", "c_proj", "c_fc"), "records_per_user": 4},
}
VARIANTS = ("nonprivate", "engine", "engine_ref", "engine_ghost", "opacus", "opacus_ghost", "engine_secure")
DEFAULT_VARIANTS = ("nonprivate", "engine", "engine_ref", "opacus", "opacus_ghost")
BATCH, SEQ, LORA_R = 32, 128, 4


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


class _PerRecordLM:
    """Opacus' ghost-clipping criterion contract: a callable with a ``reduction`` attribute; with
    ``reduction="none"`` it returns one loss per record (the same per-record causal LM loss as every variant)."""

    def __init__(self) -> None:
        self.reduction = "mean"

    def __call__(self, logits, ids, mask):
        from trainers.rlhf.sft import causal_lm_loss_per_record

        per_record = causal_lm_loss_per_record(logits, ids, mask)  # [R]
        return per_record if self.reduction == "none" else per_record.mean()


MALLOC_MODES = ("dpalign", "default", "both")
GLIBC_SUFFIX = "+glibc"


def _worker(size: str, setting: str, variant: str, steps: int, batch: int, seq: int) -> dict:
    import warnings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dpalign.allocator import keep_freed_memory

    kept = keep_freed_memory()  # a no-op under DPALIGN_MALLOC=default (the parent sets it for --malloc default)

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainers.models.lora import add_lora
    from trainers.rlhf.sft import causal_lm_loss_per_record

    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    spec = SETTINGS[setting]
    cfg = GPT2Config(n_positions=seq, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SIZES[size])
    model = add_lora(GPT2LMHeadModel(cfg).to(device), r=LORA_R, alpha=8, target_modules=spec["targets"]).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)  # [R, T]
    mask = torch.ones_like(ids)
    per_user = spec["records_per_user"]
    users = (torch.arange(batch) // per_user).to(device)  # [R]: records 4u..4u+3 belong to user u
    users = users[torch.randperm(batch, generator=gen).to(device)]  # a user's records are not contiguous

    def per_record_loss(records: dict) -> torch.Tensor:
        logits = model(input_ids=records["input_ids"]).logits  # [R, T, V]
        return causal_lm_loss_per_record(logits, records["input_ids"], records["loss_mask"])  # [R]

    records = {"input_ids": ids, "loss_mask": mask}
    if variant == "nonprivate":
        def step() -> None:
            per_record_loss(records).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif variant in ("engine", "engine_ref", "engine_ghost", "engine_secure"):
        from trainers.engine import DPEngine, FixedPolicy, UserBatch
        from trainers.engine.sampling import NoiseSeed

        secret = NoiseSeed.draw(secure_rng=variant == "engine_secure")
        mode = {"engine_ref": "materialize", "engine_ghost": "ghost"}.get(variant, "auto")
        engine = DPEngine(model, stage="bench", sampling_rate=0.01, num_users=batch * 100, seed=secret,
                          policy=FixedPolicy(noise_multiplier=1.0, clip_norm=1.0), event_sink=lambda e: None,
                          optimizer=opt, check_record_independence=False, per_user_mode=mode)
        user_batch = UserBatch(records=records, user_ids=users)

        def step() -> None:
            engine.step(user_batch, per_record_loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif variant in ("opacus", "opacus_ghost"):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(ids.cpu(), mask.cpu()), batch_size=batch)
        if variant == "opacus":
            gsm, dp_opt, _ = PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                poisson_sampling=False, grad_sample_mode="hooks",
            )

            def step() -> None:
                logits = gsm(input_ids=ids).logits  # [R, T, V]
                causal_lm_loss_per_record(logits, ids, mask).mean().backward()
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)
        else:
            gsm, dp_opt, criterion, _ = PrivacyEngine().make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                poisson_sampling=False, grad_sample_mode="ghost", criterion=_PerRecordLM(),
            )

            def step() -> None:
                logits = gsm(input_ids=ids).logits  # [R, T, V]
                criterion(logits, ids, mask).backward()  # two backward passes inside
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"variant={variant!r}: use one of {VARIANTS}")

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS") * 1024
    step()  # warm-up
    times, cpu_times, faults, sys_times = [], [], [], []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0, r0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        times.append((time.perf_counter() - t0) * 1000.0)
        cpu_times.append((time.process_time() - c0) * 1000.0)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        sys_times.append((r1.ru_stime - r0.ru_stime) * 1000.0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kb("VmHWM") * 1024
    return {
        "size": size,
        "setting": setting,
        "variant": variant,
        "device": device,
        "lora_targets": list(spec["targets"]),
        "records_per_user": per_user,
        "malloc": "dpalign" if kept else "glibc default",
        "ms_per_step": statistics.median(times),
        "ms_all": times,
        "cpu_ms_per_step": statistics.median(cpu_times),
        "minor_faults_per_step": statistics.median(faults),
        "sys_ms_per_step": statistics.median(sys_times),
        "peak_rss_mb": peak / 2**20,
        "step_mem_mb": (peak - base) / 2**20,
    }


def _ratios(by_variant: dict[str, dict]) -> None:
    """Ratios of every variant to non-private and to Opacus hooks, all measured in this run."""
    for ref_name, suffix in (("nonprivate", "ratio"), ("opacus", "vs_opacus"), ("engine_ref", "vs_engine_ref")):
        ref = by_variant.get(ref_name)
        if ref is None:
            continue
        for name, r in by_variant.items():
            if name == ref_name or (suffix == "vs_engine_ref" and not name.startswith("engine")):
                continue
            r[f"time_{suffix}"] = r["ms_per_step"] / ref["ms_per_step"]
            r[f"cpu_{suffix}"] = r["cpu_ms_per_step"] / ref["cpu_ms_per_step"]
            r[f"peak_{suffix}"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
            r[f"step_mem_{suffix}"] = r["step_mem_mb"] / max(ref["step_mem_mb"], 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object after the table")
    parser.add_argument("--json-out", default=None, help="also write that JSON object to this file")
    parser.add_argument("--sizes", default="tiny,medium", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--settings", default="attn1,all4", help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--batch", type=int, default=BATCH, help="records per step (a multiple of 4)")
    parser.add_argument("--seq", type=int, default=SEQ, help="tokens per record")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--secure-rng", action="store_true",
                        help="also time engine_secure: the engine with privacy.secure_rng (SHAKE-256 noise)")
    parser.add_argument("--malloc", default="dpalign", choices=MALLOC_MODES,
                        help="dpalign: glibc keeps freed memory, as in dpalign's processes (default); default: glibc's "
                             "default malloc (rows under '<setting>+glibc'); both: each setting both ways")
    parser.add_argument("--worker", nargs=3, metavar=("SIZE", "SETTING", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.batch < 4 or args.batch % 4 or args.seq < 2:
        parser.error("--batch must be a positive multiple of 4 and --seq >= 2")
    if args.worker:
        print(json.dumps(_worker(*args.worker, args.steps, args.batch, args.seq)))
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    settings = [s for s in args.settings.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    if args.secure_rng and "engine_secure" not in variants:
        variants.append("engine_secure")
    bad = ([s for s in sizes if s not in SIZES] + [s for s in settings if s not in SETTINGS]
           + [v for v in variants if v not in VARIANTS])
    if bad:
        parser.error(f"unknown size/setting/variant {bad}; sizes: {list(SIZES)}, settings: {list(SETTINGS)}, "
                     f"variants: {list(VARIANTS)}")
    modes = ["dpalign", "default"] if args.malloc == "both" else [args.malloc]
    results: dict[str, dict[str, dict[str, dict]]] = {}
    load = LoadAverage()
    for size in sizes:
        for setting in settings:
            for mode in modes:
                label = setting + (GLIBC_SUFFIX if mode == "default" else "")
                env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
                env["DPALIGN_MALLOC"] = "default" if mode == "default" else "dpalign"
                for variant in variants:
                    out = subprocess.run(
                        [sys.executable, __file__, "--worker", size, setting, variant, "--steps", str(args.steps),
                         "--batch", str(args.batch), "--seq", str(args.seq)],
                        capture_output=True, text=True, check=False, env=env,
                    )
                    if out.returncode != 0:
                        raise SystemExit(f"{size}/{label}/{variant} failed:\n{out.stderr[-3000:]}")
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    results.setdefault(size, {}).setdefault(label, {})[variant] = row
                _ratios(results[size][label])
    load.stop()
    nan = float("nan")
    header = (f"{'size':<7} {'setting':<12} {'variant':<13} {'ms/step':>9} {'x time':>7} {'/op':>5} {'x cpu':>6} "
              f"{'/op':>5} {'peak MB':>8} {'x peak':>7} {'/op':>5} {'step MB':>8} {'x step':>7} {'faults':>9} "
              f"{'sys ms':>7}")
    print(header)
    print("-" * len(header))
    for size, by_setting in results.items():
        for setting, by_variant in by_setting.items():
            for variant, r in by_variant.items():
                print(f"{size:<7} {setting:<12} {variant:<13} {r['ms_per_step']:>9.1f} "
                      f"{r.get('time_ratio', nan):>7.2f} {r.get('time_vs_opacus', nan):>5.2f} "
                      f"{r.get('cpu_ratio', nan):>6.2f} {r.get('cpu_vs_opacus', nan):>5.2f} "
                      f"{r['peak_rss_mb']:>8.1f} {r.get('peak_ratio', nan):>7.2f} {r.get('peak_vs_opacus', nan):>5.2f} "
                      f"{r['step_mem_mb']:>8.1f} {r.get('step_mem_ratio', nan):>7.2f} "
                      f"{r['minor_faults_per_step']:>9.0f} {r['sys_ms_per_step']:>7.0f}")
    print("x: ratio to non-private; /op: ratio to Opacus hooks (same size, setting and run). all4: Opacus clips per "
          "record (no user unit), the engine per user. faults: minor page faults per step; sys ms: system CPU time "
          f"per step; '{GLIBC_SUFFIX}': glibc's default malloc, else dpalign's (dpalign.allocator).")
    print(load.line())
    blob = {"benchmark": "dp_overhead", "batch": args.batch, "seq": args.seq, "lora_r": LORA_R,
            "steps": args.steps, "malloc": args.malloc, **load.fields(), "results": results}
    emit(blob, as_json=args.json, json_out=args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
