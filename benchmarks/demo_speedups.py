"""The demo's two compute settings, each against its baseline in the same run: the fused GELU and the rollout batch.

    python benchmarks/demo_speedups.py [--json] [--json-out PATH] [--records 128] [--seq 64] [--prompts 256]
                                       [--batch-sizes 16,128] [--max-new-tokens 24] [--reps 20]

* ``activation``: forward + backward of GPT-2's MLP activation on a [records, seq, 4 * 128] tensor (the demo's
  hidden size), ``gelu_new`` (GPT-2's definition: seven elementwise ops; ``transformers.activations.
  NewGELUActivation``) against ``gelu_pytorch_tanh`` (the same tanh approximation as one torch kernel,
  ``GELUTanh``), median of ``--reps``; also the largest difference of their outputs (they are the same function).
  ``model.activation`` picks one for the embedded GPT-2 (launch/configs/demo.yaml: the fused one).
* ``generation``: ``trainers.rollout.generate_rollouts`` (the rollout actor's code) of ``--prompts`` prompts with a
  demo-sized GPT-2 built from config (4 layers, hidden 128, vocab 4096; random weights: the time per token does not
  depend on them), at each ``--batch-sizes`` (``ppo.rollout_batch_size``, 16 by default, 128 in the demo), one
  warm-up call first; seconds and the ratio to the first batch size.

Ratios are quotients of two timings of this run; the load average is printed beside them. Threads: torch's default
(every core), as ``make run``'s learner uses.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import LoadAverage, emit  # noqa: E402  (benchmarks/ is the script directory)


def _activation(*, records: int, seq: int, reps: int) -> dict[str, float]:
    import torch
    from transformers.activations import GELUTanh, NewGELUActivation

    torch.manual_seed(0)  # the same inputs every run
    x = torch.randn(records, seq, 4 * 128, requires_grad=True)  # [R, S, 4 * n_embd]: the MLP's hidden activation
    grad = torch.randn_like(x)
    out: dict[str, float] = {}
    for name, act in (("gelu_new", NewGELUActivation()), ("gelu_pytorch_tanh", GELUTanh())):
        times = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            act(x).backward(grad)
            if i >= 2:  # two warm-ups
                times.append(time.perf_counter() - t0)
            x.grad = None
        out[f"{name}_ms"] = 1000 * statistics.median(times)
    with torch.no_grad():
        out["max_abs_diff"] = float((NewGELUActivation()(x) - GELUTanh()(x)).abs().max())
    out["speedup"] = out["gelu_new_ms"] / out["gelu_pytorch_tanh_ms"]
    return out


def _generation(*, prompts: int, batch_sizes: list[int], max_new_tokens: int) -> dict[str, object]:
    import random

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from trainers.models.tokenizer import train_tokenizer
    from trainers.rollout import generate_rollouts

    words = "the movie was great fun and the acting fine but plot thin slow a bad film with poor music warm".split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(max(prompts, 400))]
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)  # as benchmarks/ppo_iteration.py
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=4096, n_positions=256,
                                       activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
                                       pad_token_id=0)).eval()
    texts = texts[:prompts]
    kw = dict(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, seed=0)
    seconds: dict[str, float] = {}
    for b in batch_sizes:
        generate_rollouts(model, tok, texts[:b], batch_size=b, **kw)  # warm-up
        t0 = time.perf_counter()
        generate_rollouts(model, tok, texts, batch_size=b, **kw)
        seconds[str(b)] = time.perf_counter() - t0
    base = seconds[str(batch_sizes[0])]
    return {"seconds": seconds, "ratio_to_first": {b: s / base for b, s in seconds.items()}, "prompts": prompts,
            "max_new_tokens": max_new_tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object after the table")
    parser.add_argument("--json-out", default=None, help="also write that JSON object to this file")
    parser.add_argument("--records", type=int, default=128, help="activation tensor: rows")
    parser.add_argument("--seq", type=int, default=64, help="activation tensor: tokens per row")
    parser.add_argument("--reps", type=int, default=20, help="timed activation forward+backward passes")
    parser.add_argument("--prompts", type=int, default=256, help="prompts generated at each batch size")
    parser.add_argument("--batch-sizes", default="16,128", help="rollout batch sizes; the first is the baseline")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    load = LoadAverage()
    act = _activation(records=args.records, seq=args.seq, reps=args.reps)
    gen = _generation(prompts=args.prompts, batch_sizes=sizes, max_new_tokens=args.max_new_tokens)
    load.stop()
    print(f"activation fwd+bwd [{args.records}, {args.seq}, 512]: gelu_new {act['gelu_new_ms']:.2f} ms, "
          f"gelu_pytorch_tanh {act['gelu_pytorch_tanh_ms']:.2f} ms: {act['speedup']:.2f}x "
          f"(outputs differ by at most {act['max_abs_diff']:.1e})")
    for b, s in gen["seconds"].items():
        print(f"generation of {args.prompts} prompts at rollout_batch_size {b:>4}: {s:6.2f} s "
              f"({gen['ratio_to_first'][b]:.2f}x the time at {sizes[0]})")
    print(load.line())
    emit({"benchmark": "demo_speedups", "activation": act, "generation": gen, **load.fields()},
         as_json=args.json, json_out=args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
