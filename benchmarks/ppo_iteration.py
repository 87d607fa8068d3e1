"""Where a DP-PPO iteration goes: generation, scoring, the DP learner, the LoRA sync, the public evaluation.

    python benchmarks/ppo_iteration.py [--json] [--json-out PATH] [--size tiny|medium|small] [--records 96]
                                       [--eval-prompts 16] [--iterations 2] [--max-new-tokens 24]

One iteration of ``trainers.stages.ppo.learn_ppo`` with its own functions, in one process, on a GPT-2 model built
from config (``tiny`` = the demo's 4 layers, hidden 128, vocab 4096; ``medium`` = 12 layers, hidden 512, vocab
4096; ``small`` = GPT-2 small, 12 layers, hidden 768, vocab 50257, 124M parameters) saved as the SFT model, LoRA
r=4 on ``c_attn`` (the PPO default), users with 2 records each, ``ppo_epochs=1``:

  * ``generation``: ``RolloutPolicy.generate`` (the rollout actor's code, here in process) on the sampled prompts,
    ``rollout_batch_size`` prompts per left-padded ``model.generate`` call with the KV cache.
  * ``scoring``: ``pad_rollouts`` + ``build_experience`` -- the actor-critic's old log-probs and values, the
    reference's log-probs and the reward model's scores (three forwards), GAE.
  * ``learner``: ``DPEngine.step`` (per-user gradients, clipping, noise, event) + ``optimizer.step``.
  * ``lora_sync``: ``lora_state_dict`` on the learner + ``RolloutPolicy.load_lora_state`` (in process: over Ray
    add one ``ray.put`` and a remote call per actor, measured by ``SyncStats`` in a real run).
  * ``public_eval``: ``policy_change`` + ``public_eval`` on ``--eval-prompts`` public prompts (generation and three
    forwards), which ``make run`` does after every iteration.

Shares are of the sum of the five, medians over ``--iterations`` iterations after one warm-up iteration. Generated
tokens per second of ``generation`` are compared with plain ``model.generate`` on the same model, the same
left-padded batches and seeds, timed right after it in every iteration (``generate_tokens_per_s_ratio`` < 1: the wrapper's overhead). With CUDA every
stage runs under bf16 autocast (``trainers.precision``). Timings on a shared machine are noisy: the run's load
average is printed and stored with them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import LoadAverage, emit  # noqa: E402  (benchmarks/ is the script directory)

SIZES = {
    "tiny": {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 4096},
    "medium": {"n_layer": 12, "n_embd": 512, "n_head": 8, "vocab_size": 4096},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
}
PHASES = ("generation", "scoring", "learner", "lora_sync", "public_eval")
WORDS = ("the movie was great fun and the acting was fine but the plot felt thin and slow in the middle "
         "a bad film with poor acting some good music and a warm ending").split()


def _prompts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Stopwatch:
    """Seconds spent inside the block (CUDA synchronised), stored under ``name``; the block runs under bf16
    autocast on CUDA as the stages run it."""

    def __init__(self, into: dict[str, float], name: str, device: str) -> None:
        from trainers.precision import autocast

        self.into, self.name, self._autocast = into, name, autocast(device)

    def __enter__(self) -> None:
        _sync()
        self._t0 = time.perf_counter()
        self._autocast.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._autocast.__exit__(*exc)
        _sync()
        self.into[self.name] = time.perf_counter() - self._t0


def _plain_generate(model, tokenizer, prompts: list[str], *, seed: int, batch_size: int, max_new_tokens: int,
                    device: str) -> tuple[float, int]:
    """Plain ``model.generate`` on the same left-padded batches and seeds: (seconds, generated tokens up to and
    including each row's first EOS) -- the yardstick of the rollout wrapper's tokens/s."""
    import torch

    from trainers.models.tokenizer import padding_side
    from trainers.precision import autocast

    _sync()
    t0 = time.perf_counter()
    n_tok = 0
    for j, start in enumerate(range(0, len(prompts), batch_size)):
        with padding_side(tokenizer, "left"):
            enc = tokenizer([tokenizer.bos_token + p for p in prompts[start:start + batch_size]], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(seed + j)
        with torch.no_grad(), autocast(device):
            ids = model.generate(**enc, do_sample=True, max_new_tokens=max_new_tokens, temperature=1.0, top_k=None,
                                 top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)  # [b, P + T]
        new = ids[:, enc["input_ids"].shape[1]:]  # [b, T]
        seen = (new == tokenizer.eos_token_id).int().cumsum(1)  # EOS seen so far, per position
        n_tok += int(((seen == 0) | ((seen == 1) & (new == tokenizer.eos_token_id))).sum())
    _sync()
    return time.perf_counter() - t0, n_tok


def run(size: str, *, records: int, eval_prompts: int, iterations: int, max_new_tokens: int,
        rollout_batch_size: int = 16) -> dict:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from trainers.engine import DPEngine, FixedPolicy, UserBatch
    from trainers.engine.sampling import NoiseSeed
    from trainers.models.lora import add_lora
    from trainers.models.tokenizer import train_tokenizer
    from trainers.rlhf.config import PPOObjectiveConfig
    from trainers.rlhf.heads import PolicyValueModel, ScoreModel
    from trainers.rollout import RolloutPolicy, lora_state_dict
    from trainers.stages.config import PPOConfig
    from trainers.stages.ppo import (
        PPOModels,
        build_experience,
        pad_rollouts,
        policy_change,
        ppo_loss_fn,
        public_eval,
    )

    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tokenizer = train_tokenizer(_prompts(400, 1), vocab_size=300, min_frequency=1)
    cfg = GPT2Config(n_positions=256, bos_token_id=0, eos_token_id=0, pad_token_id=0, **SIZES[size])
    pcfg = PPOConfig(max_new_tokens=max_new_tokens, rollout_batch_size=rollout_batch_size)
    objective = PPOObjectiveConfig()
    with tempfile.TemporaryDirectory(prefix="dpalign-ppo-bench-") as tmp:
        sft_dir = Path(tmp) / "sft"
        GPT2LMHeadModel(cfg).save_pretrained(sft_dir)
        tokenizer.save_pretrained(sft_dir)
        lora = pcfg.lora
        policy = add_lora(AutoModelForCausalLM.from_pretrained(sft_dir), r=lora.r, alpha=lora.alpha,
                          dropout=lora.dropout, target_modules=tuple(lora.target_modules))
        actor = PolicyValueModel(policy).eval()
        reference = AutoModelForCausalLM.from_pretrained(sft_dir).eval().requires_grad_(False)
        reward = ScoreModel(AutoModelForCausalLM.from_pretrained(sft_dir)).eval().requires_grad_(False)
        models = PPOModels(actor=actor, reference=reference, reward=reward, tokenizer=tokenizer).to(device)
        rollout = RolloutPolicy(sft_dir, lora=lora, threads=0)
        rollout.model.to(device)
    params = [p for p in actor.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=pcfg.lr)
    num_users = records // 2
    engine = DPEngine(actor, stage="ppo", sampling_rate=0.05, num_users=20 * num_users, seed=NoiseSeed.draw(),
                      policy=FixedPolicy(noise_multiplier=1.0, clip_norm=1.0), event_sink=lambda e: None,
                      optimizer=optimizer, check_record_independence=False, check_weights_move=False,
                      max_records_per_microbatch=32)
    loss_fn = ppo_loss_fn(actor, objective)
    prompts = _prompts(records, 2)
    public = _prompts(eval_prompts, 3)
    user_index = (torch.arange(records) // 2).to(device)  # [R]: two records per user

    def sync() -> None:
        rollout.load_lora_state(lora_state_dict(models.policy))

    sync()
    evaluation = public_eval(models, public, cfg=pcfg, seed=7, chunk_records=32) if eval_prompts else None
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    tokens: list[int] = []
    plain_times: list[float] = []
    plain_tokens: list[int] = []
    tok = models.tokenizer
    for t in range(iterations + 1):
        timing: dict[str, float] = {}
        with _Stopwatch(timing, "generation", device):
            gen = rollout.generate(prompts, max_new_tokens=max_new_tokens, temperature=1.0, seed=100 + t,
                                   batch_size=rollout_batch_size)
        # the yardstick right after, under the same load (a shared machine's load drifts within minutes)
        plain_s, plain_n = _plain_generate(rollout.model, tok, prompts, seed=100 + t, batch_size=rollout_batch_size,
                                           max_new_tokens=max_new_tokens, device=device)
        with _Stopwatch(timing, "scoring", device):
            rolled = pad_rollouts(gen, pad_id=int(tok.pad_token_id), eos_id=int(tok.eos_token_id)).to(device)
            exp = build_experience(models, rolled, user_index, beta=0.2, objective=objective, chunk_records=32)
        with _Stopwatch(timing, "learner", device):
            engine.step(UserBatch(records=exp, user_ids=exp.user_index), loss_fn)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with _Stopwatch(timing, "lora_sync", device):
            sync()
        with _Stopwatch(timing, "public_eval", device):
            if evaluation is not None:
                policy_change(models, evaluation, clip_eps=objective.clip_eps, chunk_records=32)
                evaluation = public_eval(models, public, cfg=pcfg, seed=7, chunk_records=32)
        if t == 0:
            continue  # warm-up
        for p in PHASES:
            phases[p].append(timing[p])
        tokens.append(sum(len(r.response_ids) for r in gen))
        plain_times.append(plain_s)
        plain_tokens.append(plain_n)

    engine.close()
    median = {p: statistics.median(v) for p, v in phases.items()}
    total = sum(median.values())
    gen_tps = statistics.median(n / s for n, s in zip(tokens, phases["generation"], strict=True))
    plain_tps = statistics.median(n / s for n, s in zip(plain_tokens, plain_times, strict=True))
    return {
        "size": size, "device": device, "records": records, "users": num_users, "eval_prompts": eval_prompts,
        "max_new_tokens": max_new_tokens, "rollout_batch_size": rollout_batch_size, "iterations": iterations,
        "seconds": median, "seconds_all": phases, "iteration_s": total,
        "share": {p: median[p] / total for p in PHASES},
        "generated_tokens_per_s": gen_tps, "plain_generate_tokens_per_s": plain_tps,
        "generate_tokens_per_s_ratio": gen_tps / plain_tps,
        "lora_sync_share": median["lora_sync"] / total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object after the table")
    parser.add_argument("--json-out", default=None, help="also write that JSON object to this file")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--records", type=int, default=96, help="rollouts per iteration (2 per user)")
    parser.add_argument("--eval-prompts", type=int, default=16, help="public prompts evaluated per iteration (0: none)")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations (after 1 warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--rollout-batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    if args.records < 2 or args.records % 2 or args.iterations < 1 or args.eval_prompts < 0:
        parser.error("--records must be an even number >= 2, --iterations >= 1, --eval-prompts >= 0")
    load = LoadAverage()
    result = run(args.size, records=args.records, eval_prompts=args.eval_prompts, iterations=args.iterations,
                 max_new_tokens=args.max_new_tokens, rollout_batch_size=args.rollout_batch_size)
    load.stop()
    print(f"{'phase':<12} {'s/iter':>8} {'share':>7}")
    for p in PHASES:
        print(f"{p:<12} {result['seconds'][p]:>8.3f} {result['share'][p]:>7.1%}")
    print(f"{'iteration':<12} {result['iteration_s']:>8.3f}")
    print(f"generated tokens/s: {result['generated_tokens_per_s']:.1f} (rollout) vs "
          f"{result['plain_generate_tokens_per_s']:.1f} (plain model.generate): "
          f"{result['generate_tokens_per_s_ratio']:.2f}x")
    print(load.line())
    blob = {"benchmark": "ppo_iteration", **load.fields(), "result": result}
    emit(blob, as_json=args.json, json_out=args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
