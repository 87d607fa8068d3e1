"""DP step overhead: the same LoRA training step non-private, with the dpalign engine, and with stock Opacus.

    python benchmarks/dp_overhead.py [--json] [--sizes tiny,medium] [--steps N] [--secure-rng]

Setup (the same for the three variants): a GPT-2-architecture model (``tiny`` = the embedded default, 4 layers,
hidden 128; ``medium`` = 12 layers, hidden 512), vocab 4096, LoRA r=4 on c_attn, batch 32 records of 128 tokens,
per-record causal LM loss, SGD. One record per user (the most per-user work per record).
  * ``nonprivate``: ``loss.mean().backward(); opt.step()``.
  * ``engine``: ``DPEngine.step`` (per-user grads, per-module clipping, isotropic noise, event) + ``opt.step()``,
    noise keyed by a fresh OS secret (the default of every run; torch's generator).
  * ``engine_secure`` (``--secure-rng``): the same with ``privacy.secure_rng`` (noise from the SHAKE-256 CSPRNG).
  * ``opacus``: ``PrivacyEngine.make_private(grad_sample_mode="hooks")`` on the same peft model; flat clipping.

Time: median wall-clock ms per step over ``--steps`` steps after one warm-up step (perf_counter), and the
median process CPU time per step (``time.process_time``, all threads): on a machine shared with other jobs the
wall clock mostly measures the others, the CPU time much less so (compare ratios of the same column).
Memory: each (size, variant) runs in a fresh subprocess (no allocator reuse or hooks leak across variants).
After building the model the process resets its peak-RSS counter (``/proc/self/clear_refs`` = 5) and records the
current RSS; after the steps it reads VmHWM. ``peak_rss_mb`` is the process peak during the steps;
``step_mem_mb`` = peak - RSS before the steps (activations, gradients, per-user buffers). On CUDA the same two
numbers come from ``torch.cuda.max_memory_allocated`` and ``memory_allocated``. Ratios are to non-private.
On a shared machine timings are noisy: the absolute numbers and the run's load average are printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "tiny": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "medium": {"n_layer": 12, "n_embd": 512, "n_head": 8},
}
VARIANTS = ("nonprivate", "engine", "opacus", "engine_secure")
DEFAULT_VARIANTS = ("nonprivate", "engine", "opacus")
VOCAB, BATCH, SEQ = 4096, 32, 128


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _worker(size: str, variant: str, steps: int) -> dict:
    import warnings

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from trainers.models.lora import add_lora
    from trainers.rlhf.sft import causal_lm_loss_per_record

    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SIZES[size])
    model = add_lora(GPT2LMHeadModel(cfg).to(device), r=4, alpha=8).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).to(device)  # [B, T]
    mask = torch.ones_like(ids)

    def per_record_loss(records: dict) -> torch.Tensor:
        logits = model(input_ids=records["input_ids"]).logits  # [R, T, V]
        return causal_lm_loss_per_record(logits, records["input_ids"], records["loss_mask"])  # [R]

    records = {"input_ids": ids, "loss_mask": mask}
    if variant == "nonprivate":
        def step() -> None:
            per_record_loss(records).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif variant in ("engine", "engine_secure"):
        from trainers.engine import DPEngine, FixedPolicy, UserBatch
        from trainers.engine.sampling import NoiseSeed

        secret = NoiseSeed.draw(secure_rng=variant == "engine_secure")
        engine = DPEngine(model, stage="bench", sampling_rate=0.01, num_users=BATCH * 100, seed=secret,
                          policy=FixedPolicy(noise_multiplier=1.0, clip_norm=1.0), event_sink=lambda e: None,
                          optimizer=opt, check_record_independence=False)
        batch = UserBatch(records=records, user_ids=torch.arange(BATCH, device=device))

        def step() -> None:
            engine.step(batch, per_record_loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    elif variant == "opacus":
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(ids.cpu(), mask.cpu()), batch_size=BATCH)
        gsm, dp_opt, _ = PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode="hooks",
        )

        def step() -> None:
            logits = gsm(input_ids=ids).logits  # [B, T, V]
            causal_lm_loss_per_record(logits, ids, mask).mean().backward()
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
    times, cpu_times = [], []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
        cpu_times.append((time.process_time() - c0) * 1000.0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kb("VmHWM") * 1024
    return {
        "size": size,
        "variant": variant,
        "device": device,
        "ms_per_step": statistics.median(times),
        "ms_all": times,
        "cpu_ms_per_step": statistics.median(cpu_times),
        "peak_rss_mb": peak / 2**20,
        "step_mem_mb": (peak - base) / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object after the table")
    parser.add_argument("--sizes", default="tiny,medium", help="comma-separated: tiny, medium")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--secure-rng", action="store_true",
                        help="also time engine_secure: the engine with privacy.secure_rng (SHAKE-256 noise)")
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.worker:
        print(json.dumps(_worker(args.worker[0], args.worker[1], args.steps)))
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    if args.secure_rng and "engine_secure" not in variants:
        variants.append("engine_secure")
    bad = [s for s in sizes if s not in SIZES] + [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"unknown size/variant {bad}; sizes: {list(SIZES)}, variants: {list(VARIANTS)}")
    results: dict[str, dict[str, dict]] = {}
    load_before = os.getloadavg()[0]
    for size in sizes:
        for variant in variants:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", size, variant, "--steps", str(args.steps)],
                capture_output=True, text=True, check=False,
            )
            if out.returncode != 0:
                raise SystemExit(f"{size}/{variant} failed:\n{out.stderr[-3000:]}")
            results.setdefault(size, {})[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    for by_variant in results.values():
        ref = by_variant.get("nonprivate")
        for r in by_variant.values():
            if ref is not None:
                r["time_ratio"] = r["ms_per_step"] / ref["ms_per_step"]
                r["cpu_ratio"] = r["cpu_ms_per_step"] / ref["cpu_ms_per_step"]
                r["peak_ratio"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
                r["step_mem_ratio"] = r["step_mem_mb"] / max(ref["step_mem_mb"], 1e-9)
        if "engine" in by_variant and "opacus" in by_variant:
            eng, opa = by_variant["engine"], by_variant["opacus"]
            eng["time_vs_opacus"] = eng["ms_per_step"] / opa["ms_per_step"]
            eng["cpu_vs_opacus"] = eng["cpu_ms_per_step"] / opa["cpu_ms_per_step"]
        if "engine" in by_variant and "engine_secure" in by_variant:
            eng, sec = by_variant["engine"], by_variant["engine_secure"]
            sec["time_vs_engine"] = sec["ms_per_step"] / eng["ms_per_step"]
            sec["cpu_vs_engine"] = sec["cpu_ms_per_step"] / eng["cpu_ms_per_step"]
    header = f"{'size':<7} {'variant':<14} {'ms/step':>9} {'x time':>7} {'cpu ms':>9} {'x cpu':>6} {'peak MB':>9} {'x peak':>7} {'step MB':>9} {'x step':>7}"
    print(header)
    print("-" * len(header))
    for size, by_variant in results.items():
        for variant, r in by_variant.items():
            print(f"{size:<7} {variant:<14} {r['ms_per_step']:>9.1f} {r.get('time_ratio', float('nan')):>7.2f} "
                  f"{r['cpu_ms_per_step']:>9.1f} {r.get('cpu_ratio', float('nan')):>6.2f} "
                  f"{r['peak_rss_mb']:>9.1f} {r.get('peak_ratio', float('nan')):>7.2f} {r['step_mem_mb']:>9.1f} "
                  f"{r.get('step_mem_ratio', float('nan')):>7.2f}")
    for size, by_variant in results.items():
        if "time_vs_engine" in by_variant.get("engine_secure", {}):
            sec = by_variant["engine_secure"]
            print(f"{size}: secure_rng costs {sec['time_vs_engine']:.2f}x the engine's step time "
                  f"({sec['cpu_vs_engine']:.2f}x CPU)")
    print(f"load average 1 min: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)")
    if args.json:
        print(json.dumps({"benchmark": "dp_overhead", "batch": BATCH, "seq": SEQ, "vocab": VOCAB, "lora_r": 4,
                          "steps": args.steps, "load_avg_1min": [load_before, os.getloadavg()[0]],
                          "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
