"""dpalign's pipeline with privacy off against TRL's own trainers, on the same task, model, LoRA, steps and batch.

    python benchmarks/peer_trl.py [--config launch/configs/tiny.yaml] [--json] [KEY=VALUE ...]

Needs the ``bench`` extra (``pip install 'dpalign[bench]'``: TRL). Both systems start from the same cached base
model and the same embedded task (D1 demonstrations, D2 preference pairs, D3 prompts, public evaluation prompts):

* **dpalign**: ``dpalign run`` with ``privacy.preset=nonprivate`` (no noise, no clipping, the same Poisson-sampled
  schedule) and ``run.report_wall_time=true``.
* **TRL** (the installed version): ``SFTTrainer`` on D1 (prompt-completion format, loss on the completion), then
  ``RewardTrainer`` on D2 (an ``AutoModelForSequenceClassification`` from the SFT model), then ``GRPOTrainer`` on
  D3 with that reward model. GRPO because it is the PPO-family trainer of TRL's stable API in 1.x (``PPOTrainer``
  left it): PPO's clipped surrogate with group-relative advantages over ``num_generations`` samples per prompt
  instead of a learned value head, and a KL penalty ``beta`` to the reference.

Matched: the base model, LoRA (r, alpha, target modules) on every stage, learning rates, optimizer (Adam/AdamW
without weight decay, constant learning rate), steps (dpalign's stage schedule), records per step (dpalign's
expected batch: expected users x mean records per user), maximum lengths, generation length and temperature, the
KL coefficient, and the prompt layout (``<|endoftext|> + prompt``). Not matched, by design of each library: dpalign
samples users by Poisson sampling, TRL shuffles fixed-size batches; dpalign's PPO takes ``ppo.samples_per_prompt``
rollouts per prompt (with a learned value head at 1, RLOO's leave-one-out baseline at >= 2, as the demo config),
GRPO samples ``num_generations`` = max(2, that) per prompt and divides advantages by the group's deviation; the
rollouts per step are matched (so GRPO's prompts per step are fewer where it samples more per prompt).

Measured the same way for both, with dpalign's public evaluation code: gold reward (VADER) of samples on the
public held-out prompts with a 95% CI, KL of the final policy to its own SFT model on those samples, reward-model
accuracy on public gold-labeled pairs, and wall time per stage (perf_counter; both in this process, one after
the other, under the same load). Prints JSON with the ratios dpalign / TRL.

DP-SFT against the do-it-yourself setup (``--dp-epsilon``, default 4; 0 skips it): dpalign's private SFT stage
against peft LoRA + Opacus's ``PrivacyEngine`` + a plain training loop at the same (epsilon, delta), steps,
expected batch, clip norm and learning rate (:func:`run_opacus_sft` lists what is matched and what is not: Opacus
protects a record, dpalign a user), both evaluated by dpalign's public evaluation (perplexity on public held-out
text, gold reward of samples).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import repo_relative  # noqa: E402  (benchmarks/ is the script directory)


def _records_per_step(rows: Any, expected_users: float) -> int:
    users = len(set(rows["user_id"]))
    return max(1, round(expected_users * len(rows) / users))


def _clip(tok: Any, prompt: str, completion: str, max_tokens: int) -> str:
    """``completion`` cut so that prompt + completion + EOS fits in ``max_tokens`` tokens."""
    keep = max(1, max_tokens - len(tok(prompt, add_special_tokens=False)["input_ids"]) - 1)
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    return completion if len(ids) <= keep else tok.decode(ids[:keep])


def _lora(cfg: Any, task_type: str) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      fan_in_fan_out=True, bias="none", task_type=task_type)


def _common_args(out: Path, *, steps: int, batch: int, lr: float) -> dict[str, Any]:
    return dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=max(1, steps),
                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)


def run_trl(cfg: Any, task: Any, base_dir: Path, work: Path) -> dict[str, Any]:
    """TRL's SFT -> reward model -> GRPO on the same data; returns directories and wall times."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from trainers.data.io import load_preferences, load_prompts, load_sft
    from trainers.models.lora import merge_and_save
    from trainers.stages.config import PoissonStageConfig  # noqa: F401 (documents where the schedules come from)

    tok = AutoTokenizer.from_pretrained(base_dir)
    bos = tok.bos_token or tok.eos_token
    wall: dict[str, float] = {}
    sft_rows, rm_rows, ppo_rows = load_sft(task.sft).rows, load_preferences(task.rm).rows, load_prompts(task.ppo)
    n_sft, n_rm = len(set(sft_rows["user_id"])), len(set(rm_rows["user_id"]))

    # SFT on D1
    t = time.perf_counter()
    sft_ds = datasets.Dataset.from_dict({"prompt": [bos + p for p in sft_rows["prompt"]],
                                         "completion": list(sft_rows["response"])})
    args = SFTConfig(**_common_args(work / "sft", steps=cfg.sft.num_steps(n_sft),
                                    batch=_records_per_step(sft_rows, cfg.sft.expected_batch_users), lr=cfg.sft.lr),
                     max_length=cfg.sft.max_len, completion_only_loss=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base_dir), args=args, train_dataset=sft_ds,
                         processing_class=tok, peft_config=_lora(cfg.sft.lora, "CAUSAL_LM"))
    trainer.train()
    sft_dir = merge_and_save(trainer.model, tok, work / "sft_model")
    wall["sft"] = time.perf_counter() - t

    # reward model on D2
    t = time.perf_counter()
    # TRL drops pairs longer than max_length; dpalign keeps each text's first max_len tokens. Cut the completions
    # here so both train on the same (truncated) texts, and turn TRL's filter off.
    prompts = [bos + p for p in rm_rows["prompt"]]
    rm_ds = datasets.Dataset.from_dict({
        "prompt": prompts,
        "chosen": [_clip(tok, p, c, cfg.rm.max_len) for p, c in zip(prompts, rm_rows["chosen"], strict=True)],
        "rejected": [_clip(tok, p, r, cfg.rm.max_len) for p, r in zip(prompts, rm_rows["rejected"], strict=True)],
    })
    args = RewardConfig(**_common_args(work / "rm", steps=cfg.rm.num_steps(n_rm),
                                       batch=_records_per_step(rm_rows, cfg.rm.expected_batch_users), lr=cfg.rm.lr),
                        max_length=None)
    rm_model = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)
    rm_model.config.pad_token_id = tok.pad_token_id
    trainer = RewardTrainer(model=rm_model, args=args, train_dataset=rm_ds, processing_class=tok,
                            peft_config=_lora(cfg.rm.lora, "SEQ_CLS"))
    trainer.train()
    rm_dir = merge_and_save(trainer.model, tok, work / "rm_model")
    wall["rm"] = time.perf_counter() - t

    # GRPO on D3 prompts with that reward model
    t = time.perf_counter()
    gens = max(2, cfg.ppo.samples_per_prompt)
    per_iteration = cfg.ppo.expected_users_per_iteration * cfg.ppo.samples_per_prompt  # dpalign's rollouts, about
    rollouts = max(gens, gens * math.ceil(per_iteration / gens))
    ppo_ds = datasets.Dataset.from_dict({"prompt": [bos + p for p in ppo_rows.rows["prompt"]]})
    args = GRPOConfig(**_common_args(work / "grpo", steps=cfg.ppo.iterations, batch=rollouts, lr=cfg.ppo.lr),
                      num_generations=gens, max_completion_length=cfg.ppo.max_new_tokens,
                      temperature=cfg.ppo.temperature, beta=cfg.ppo.objective.init_kl_coef, num_iterations=1)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(sft_dir), reward_funcs=str(rm_dir), args=args,
                          train_dataset=ppo_ds, processing_class=tok, reward_processing_classes=tok,
                          peft_config=_lora(cfg.ppo.lora, "CAUSAL_LM"))
    trainer.train()
    final_dir = merge_and_save(trainer.model, tok, work / "final_model")
    wall["ppo"] = time.perf_counter() - t
    return {"sft_dir": sft_dir, "rm_dir": rm_dir, "final_dir": final_dir, "wall_time_s": wall,
            "batches": {"sft": _records_per_step(sft_rows, cfg.sft.expected_batch_users),
                        "rm": _records_per_step(rm_rows, cfg.rm.expected_batch_users),
                        "grpo_rollouts_per_step": rollouts, "grpo_num_generations": gens}}


def run_opacus_sft(cfg: Any, task: Any, base_dir: Path, out: Path, *, target_epsilon: float, delta: float
                   ) -> dict[str, Any]:
    """DP-SFT the do-it-yourself way: peft LoRA + Opacus ``PrivacyEngine`` + a plain PyTorch/HF training loop.

    Matched with dpalign's DP-SFT: the base model, LoRA, tokenized D1 records (prompt masked), Adam and its learning
    rate, steps, expected batch (dpalign's expected users x mean records per user), the clip norm (Opacus clips
    each record's whole gradient to ``engine.clip_norm``; dpalign splits the same L2 budget over its groups),
    (epsilon, delta) and Poisson sampling. The privacy unit differs by design: Opacus samples and clips RECORDS,
    so its (epsilon, delta) protects one record, a weaker guarantee than dpalign's per-user one when a user holds
    several records (group privacy over k records costs about k epsilon). The noise multiplier comes from Opacus's
    own PRV accountant for its record-level sampling rate.
    """
    import torch
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier
    from peft import get_peft_model
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import AutoModelForCausalLM

    from trainers.data.chat import configure_chat
    from trainers.data.io import load_sft
    from trainers.models.lora import merge_and_save
    from trainers.models.tokenizer import load_tokenizer
    from trainers.rlhf.sft import causal_lm_loss_per_record, tokenize_sft_pairs
    from trainers.stages.sft import chat_mode, sft_texts

    t = time.perf_counter()
    rows = load_sft(task.sft).rows
    steps = cfg.sft.num_steps(len(set(rows["user_id"])))
    batch_records = _records_per_step(rows, cfg.sft.expected_batch_users)
    tok = configure_chat(load_tokenizer(base_dir), chat_mode(cfg))
    prompts, responses = sft_texts(tok, list(rows["prompt"]), list(rows["response"]))
    enc = tokenize_sft_pairs(tok, prompts, responses, max_length=cfg.sft.max_len)
    data = TensorDataset(enc.input_ids, enc.attention_mask, enc.loss_mask)
    torch.manual_seed(cfg.run.seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), _lora(cfg.sft.lora, "CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.sft.lr)
    sample_rate = batch_records / len(data)
    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                 steps=steps, accountant="prv")
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=batch_records),
        noise_multiplier=sigma, max_grad_norm=cfg.engine.clip_norm, poisson_sampling=True)
    done = 0
    while done < steps:
        for ids, mask, loss_mask in loader:
            optimizer.zero_grad()
            if len(ids):
                width = int(mask.sum(1).max().clamp(min=1))
                logits = model(input_ids=ids[:, :width], attention_mask=mask[:, :width]).logits
                causal_lm_loss_per_record(logits, ids[:, :width], loss_mask[:, :width]).mean().backward()
            optimizer.step()  # an empty Poisson batch still adds the noise, as the accountant assumes
            done += 1
            if done == steps:
                break
    spent = engine.get_epsilon(delta)
    model.remove_hooks()  # Opacus's per-sample hooks off before the adapters are merged into a plain export
    merge_and_save(model._module, tok, out)
    return {"dir": out, "wall_time_s": time.perf_counter() - t, "steps": steps, "records_per_step": batch_records,
            "sample_rate_records": sample_rate, "noise_multiplier": sigma, "epsilon": spent, "delta": delta,
            "privacy_unit": "record", "opacus_version": __import__("opacus").__version__}


def trl_rm_accuracy(rm_dir: Path, pairs: list[tuple[str, str]], *, max_len: int) -> float:
    """Accuracy of a TRL reward model on the public gold pairs, scored as TRL trains it (BOS + text + EOS), each
    text cut to its first ``max_len`` tokens as dpalign's accuracy does."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(rm_dir)
    bos = tok.bos_token or tok.eos_token
    wins = 0
    with torch.no_grad():
        for chosen, rejected in pairs:
            enc = tok([bos + chosen + tok.eos_token, bos + rejected + tok.eos_token], return_tensors="pt",
                      padding=True, truncation=True, max_length=max_len, add_special_tokens=False)
            score = model(**enc).logits[:, 0]
            wins += int(score[0] > score[1])
    return wins / len(pairs)


def evaluate(cfg: Any, policy_dir: Path, sft_dir: Path, prompts: list[str], windows: Any) -> dict[str, Any]:
    from trainers.models.base import load_base_model
    from trainers.stages.evaluate import evaluate_policy

    model, tok = load_base_model(policy_dir)
    reference, _ = load_base_model(sft_dir)
    return evaluate_policy(model, tok, prompts, eval_cfg=cfg.eval, reference=reference, public_windows=windows)


def dp_sft_comparison(args: Any, work: Path, windows: Any, prompts: list[str], *, base_dir: Path, task: Any
                      ) -> dict[str, Any]:
    """dpalign's DP-SFT against Opacus + a plain loop at the same (epsilon, delta), evaluated by the same code.

    dpalign's side is its private pipeline with the later stages cut to one step (only the SFT stage is compared);
    its delta is the plan's for D1, and Opacus gets the same delta."""
    from launch.config import load_config
    from launch.pipeline.pipeline import run_pipeline
    from launch.schema import RunConfig

    cfg = load_config(RunConfig, args.config, [
        *args.overrides, "privacy.preset=private", f"privacy.target_epsilon={args.dp_epsilon}",
        "run.report_wall_time=true", f"run.dir={work / 'dpalign-dp'}", "ppo.rollout_actors=0", "rm.steps=1",
        "ppo.iterations=1"])
    report = run_pipeline(cfg, progress=False)
    sft_privacy = report["privacy"]["stages"]["sft"]
    ours = report["evaluation"]["policies"]["sft"]
    opacus = run_opacus_sft(cfg, task, base_dir, work / "opacus_sft", target_epsilon=args.dp_epsilon,
                            delta=sft_privacy["delta"])
    theirs = evaluate(cfg, opacus["dir"], opacus["dir"], prompts, windows)
    base = evaluate(cfg, base_dir, base_dir, prompts, windows)
    return {
        "target_epsilon": args.dp_epsilon, "delta": sft_privacy["delta"],
        "base": {"gold_reward": base["gold_reward"], "perplexity": base["perplexity"]},
        "dpalign": {"gold_reward": ours["gold_reward"], "perplexity": ours["perplexity"],
                    "epsilon": sft_privacy["epsilon"], "privacy_unit": "user",
                    "wall_time_s": report["wall_time_s"].get("sft"),
                    "noise_multiplier": report["stages"]["sft"]["privacy"]["noise_multiplier"],
                    "sampling_rate_users": report["stages"]["sft"]["privacy"]["sampling_rate"]},
        "opacus": {"gold_reward": theirs["gold_reward"], "perplexity": theirs["perplexity"],
                   **{k: v for k, v in opacus.items() if k != "dir"}},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "launch" / "configs" / "tiny.yaml"))
    parser.add_argument("--dp-epsilon", type=float, default=4.0,
                        help="epsilon of the DP-SFT comparison (dpalign's DP-SFT vs Opacus + a plain loop); 0: skip")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from launch.config import load_config
    from launch.pipeline.pipeline import run_pipeline
    from launch.schema import RunConfig
    from trainers.data.io import load_eval_prompts, load_public
    from trainers.data.task import build_task
    from trainers.models.base import ensure_base_model, load_base_model, validation_windows
    from trainers.stages.rm import gold_pairs

    with tempfile.TemporaryDirectory(prefix="peer-trl-") as tmp:
        work = Path(tmp)
        cfg = load_config(RunConfig, args.config, [*args.overrides, "privacy.preset=nonprivate",
                                                   "run.report_wall_time=true", f"run.dir={work / 'dpalign'}",
                                                   "ppo.rollout_actors=0"])
        t = time.perf_counter()
        report = run_pipeline(cfg, progress=False)  # builds (or reuses) the task and the base model
        dp_total = time.perf_counter() - t
        task = build_task(cfg.data, cache_dir=cfg.run.cache_dir, progress=False)
        base = ensure_base_model(cfg.model, cfg.data, cache_dir=cfg.run.cache_dir,
                                 public_train=task.public_train or None, public_valid=task.public_valid or None,
                                 progress=False)
        prompts = list(load_eval_prompts(task.eval).rows["prompt"])[: cfg.eval.prompts]
        # the windows the pipeline evaluated on (its validation text), so both systems' perplexities compare
        public_valid = list(load_public(task.validation_text).rows["text"]) if task.validation_text else []
        _, tok = load_base_model(base.path)
        windows = validation_windows(tok, public_valid, model_cfg=cfg.model, count=cfg.eval.perplexity_records)

        t = time.perf_counter()
        trl = run_trl(cfg, task, Path(base.path), work / "trl")
        trl_total = time.perf_counter() - t
        trl_eval = evaluate(cfg, trl["final_dir"], trl["sft_dir"], prompts, windows)
        trl_sft_eval = evaluate(cfg, trl["sft_dir"], trl["sft_dir"], prompts, windows)
        pairs = gold_pairs(public_valid, count=cfg.rm.gold_pairs, seed=cfg.run.seed)
        trl_acc = trl_rm_accuracy(trl["rm_dir"], pairs, max_len=cfg.rm.max_len)
        dp_sft = dp_sft_comparison(args, work, windows, prompts, base_dir=Path(base.path), task=task) \
            if args.dp_epsilon > 0 else None

    pols = report["evaluation"]["policies"]
    dp_wall = {k: report["wall_time_s"].get(k) for k in ("sft", "rm", "ppo")}
    result = {
        "config": repo_relative(args.config), "overrides": args.overrides, "load_average": os.getloadavg(),
        "trl_version": __import__("trl").__version__,
        "dpalign": {"gold_reward": {"sft": pols["sft"]["gold_reward"], "final": pols["final"]["gold_reward"]},
                    "kl_final_to_sft": pols["final"]["kl_to_sft"],
                    "rm_accuracy": report["evaluation"]["reward_model"]["accuracy"],
                    "wall_time_s": {**dp_wall, "total_with_eval": dp_total}},
        "trl": {"gold_reward": {"sft": trl_sft_eval["gold_reward"], "final": trl_eval["gold_reward"]},
                "kl_final_to_sft": trl_eval["kl_to_sft"], "rm_accuracy": trl_acc,
                "wall_time_s": {**trl["wall_time_s"], "total_with_eval": trl_total}, "batches": trl["batches"]},
    }
    if dp_sft is not None:
        result["dp_sft"] = dp_sft
    result["ratios_dpalign_over_trl"] = {
        f"wall_{k}": (dp_wall[k] / trl["wall_time_s"][k]) if dp_wall[k] else None for k in ("sft", "rm", "ppo")}
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
