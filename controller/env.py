"""A gymnasium environment of PROXY DP fine-tuning on PUBLIC text: where the controller learns at no privacy cost.

One episode = a short DP-SGD LoRA fine-tune of a tiny GPT-2 (byte-level, so no tokenizer build) on public
reviews: Poisson sampling at rate q, per-example gradients of every LoRA module, group-wise clipping to C_k,
isotropic Gaussian noise s_k = sigma * ||C||_2, division by the public expected batch size q*N, Adam. Every
``interval`` DP steps the agent sets (C_k, sigma) for the next interval through the same spaces and the same budget
layer a private run uses, and is rewarded by the decrease of the held-out (public) validation loss, minus an
optional penalty on the budget share spent. The episode's "private" texts are public, so the accounting inside an
episode costs nothing: it only teaches the agent how budgets behave.

The observation is built by :func:`controller.spaces.features_from_released` from a :class:`Released` record, as
in a private run: the agent never sees a per-example value even here, so what it learns transfers.

Domain shift: the base model pretrains (non-privately, once per env) on mixed-sentiment public reviews; the
fine-tune set is strongly positive reviews in one author's style, which the base model has not specialised to.
"""

from __future__ import annotations

import math
import random
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from controller.budget import BudgetGuard
from controller.config import ProxyEnvConfig
from controller.records import Released, ValidationStats
from controller.spaces import SpaceSpec, features_from_released, initial_observation

EOS_BYTE = 256
VOCAB = 257


def public_texts(n: int, *, seed: int, sentiment: float | None = None, one_style: bool = False) -> list[str]:
    """``n`` public reviews from the embedded generator (public styles; no private user is involved)."""
    from trainers.data.generator import ReviewGenerator

    rng = random.Random(f"controller-proxy-{seed}-{sentiment}-{one_style}")
    gen = ReviewGenerator(seed=seed, catalogue_size=60)
    style = gen.style(rng, public=True)
    out = []
    for _ in range(n):
        if not one_style:
            style = gen.style(rng, public=True)
        s = sentiment if sentiment is not None else rng.uniform(-1.0, 1.0)
        out.append(gen.review(rng, style=style, sentiment=s).text)
    return out


def encode_bytes(texts: list[str], seq_len: int) -> Tensor:
    """[n, seq_len] byte ids: <eos> + the first seq_len - 1 bytes of each text (shorter ones padded with <eos>)."""
    rows = []
    for t in texts:
        b = [EOS_BYTE] + list(t.encode("utf-8"))[: seq_len - 1]
        rows.append(b + [EOS_BYTE] * (seq_len - len(b)))
    return torch.tensor(rows, dtype=torch.long)


class PerExampleGrads:
    """Per-example gradients of LoRA A/B weights (bias-free nn.Linear) from one batched forward/backward.

    For y = x W^T with x [b, T, i] and dL/dy [b, T, o], example j's gradient is sum_t dL/dy[j, t] x[j, t]^T
    (Opacus's Linear rule); activations come from a forward hook, output gradients from a tensor hook.
    """

    def __init__(self, modules: list[nn.Linear]) -> None:
        self.modules = modules
        self._acts: dict[int, Tensor] = {}
        self._grads: dict[int, Tensor] = {}
        for m in modules:
            m.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        key = id(module)
        self._acts[key] = inputs[0].detach()

        def store(g: Tensor) -> None:
            self._grads[key] = g.detach()

        output.register_hook(store)

    def collect(self) -> list[Tensor]:
        """[b, o, i] per-example weight gradient of each module, in ``modules`` order; clears the buffers."""
        out = [torch.einsum("bto,bti->boi", self._grads[id(m)], self._acts[id(m)]) for m in self.modules]
        self._acts.clear()
        self._grads.clear()
        return out


class ProxyDPTrainer:
    """A tiny GPT-2 + LoRA fine-tuned with DP-SGD on public texts (the proxy of a private stage)."""

    def __init__(self, cfg: ProxyEnvConfig) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        from trainers.models.lora import add_lora, lora_groups

        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        config = GPT2Config(
            vocab_size=VOCAB, n_positions=max(cfg.seq_len, 16), n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
            bos_token_id=EOS_BYTE, eos_token_id=EOS_BYTE,
        )
        base = GPT2LMHeadModel(config)
        self._pretrain_base(base)
        self.model = add_lora(base, r=cfg.lora_r, alpha=2.0 * cfg.lora_r, target_modules=tuple(cfg.lora_targets))
        self.model.eval()  # no dropout anywhere; gradients still flow
        groups = lora_groups(self.model)
        self.group_names = tuple(groups)
        self.params = [p for ps in groups.values() for p in ps]  # [A0, B0, A1, B1, ...]
        self.group_sizes = tuple(sum(p.numel() for p in ps) for ps in groups.values())
        owners = {id(p): m for m in self.model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
        self.grads = PerExampleGrads([owners[id(p)] for p in self.params])
        self._init_state = {id(p): p.detach().clone() for p in self.params}
        self.train_ids = encode_bytes(
            public_texts(cfg.train_texts, seed=cfg.seed + 1, sentiment=0.9, one_style=True), cfg.seq_len
        )
        self.valid_ids = encode_bytes(
            public_texts(cfg.valid_texts, seed=cfg.seed + 2, sentiment=0.9, one_style=True), cfg.seq_len
        )
        self.reset(seed=cfg.seed)

    def _pretrain_base(self, base: nn.Module) -> None:
        cfg = self.cfg
        if cfg.base_pretrain_steps == 0:
            return
        ids = encode_bytes(public_texts(512, seed=cfg.seed), cfg.seq_len)
        opt = torch.optim.Adam(base.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(cfg.seed)
        base.train()
        for _ in range(cfg.base_pretrain_steps):
            x = ids[torch.randint(0, ids.shape[0], (32,), generator=gen)]
            loss = base(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)

    def reset(self, *, seed: int) -> None:
        """Fresh adapter (B = 0 so the model starts at the base; A re-drawn per seed), optimizer and sampler."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if i % 2 == 0:  # A: same scale as at creation, new draw
                    p.copy_(torch.randn(p.shape, generator=gen) * self._init_state[id(p)].std())
                else:
                    p.zero_()
        self.opt = torch.optim.Adam(self.params, lr=self.cfg.lr)
        self.sampler = np.random.default_rng(seed)
        self.prev_noisy: list[Tensor] | None = None

    @torch.no_grad()
    def validation_loss(self) -> float:
        return float(self.model(input_ids=self.valid_ids, labels=self.valid_ids).loss)

    def dp_step(self, *, step: int, clip_norms: tuple[float, ...], sigma: float, sampling_rate: float) -> Released:
        """One DP-SGD step; returns what it released (summaries of the noised update only)."""
        n = self.train_ids.shape[0]
        k = len(self.group_names)
        expected_batch = sampling_rate * n  # public normalizer, never the realized batch size
        idx = np.nonzero(self.sampler.random(n) < sampling_rate)[0]
        sums = [torch.zeros_like(p) for p in self.params]
        if idx.size:
            x = self.train_ids[torch.as_tensor(idx)]  # [b, T]
            logits = self.model(input_ids=x).logits  # [b, T, V]
            per_token = F.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="none"
            ).view(x.shape[0], -1)  # [b, T-1]
            per_token.mean(dim=1).sum().backward()  # sum of per-example mean losses: no cross-example term
            per_ex = self.grads.collect()  # per param: [b, o, i]
            for g in range(k):
                a, b_ = per_ex[2 * g], per_ex[2 * g + 1]
                norms = (a.flatten(1).pow(2).sum(1) + b_.flatten(1).pow(2).sum(1)).sqrt()  # [b]
                factor = (clip_norms[g] / (norms + 1e-12)).clamp(max=1.0)  # [b]
                sums[2 * g] = torch.einsum("b,boi->oi", factor, a)
                sums[2 * g + 1] = torch.einsum("b,boi->oi", factor, b_)
            for p in self.params:
                p.grad = None
        std = sigma * math.sqrt(sum(c * c for c in clip_norms))  # isotropic: sigma_eff = sigma
        noisy = [(s + torch.randn_like(s) * std) / expected_batch for s in sums]
        for p, g in zip(self.params, noisy):
            p.grad = g
        self.opt.step()
        sq, cos = [], []
        for g in range(k):
            cur = torch.cat([noisy[2 * g].flatten(), noisy[2 * g + 1].flatten()])
            sq.append(float(cur.pow(2).sum()))
            if self.prev_noisy is None:
                cos.append(0.0)
            else:
                cos.append(float(F.cosine_similarity(cur, self.prev_noisy[g], dim=0)))
        self.prev_noisy = [
            torch.cat([noisy[2 * g].flatten(), noisy[2 * g + 1].flatten()]) for g in range(k)
        ]
        return Released(
            step=step, group_names=self.group_names, group_sizes=self.group_sizes,
            clip_norms=tuple(float(c) for c in clip_norms), noise_stds=(std,) * k,
            expected_batch_size=expected_batch, noisy_grad_sq_norms=tuple(sq), noisy_cos_prev=tuple(cos),
        )


class ProxyDPEnv(gym.Env):
    """gymnasium Env: one decision (clip thresholds per depth bucket + sigma) per ``interval`` DP steps.

    Args:
        config: the proxy episode (a :class:`ProxyEnvConfig` or its dict, as RLlib passes env_config).
        spec: the spaces (a :class:`SpaceSpec` or its dict).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, config: ProxyEnvConfig | dict | None = None, spec: SpaceSpec | dict | None = None) -> None:
        if isinstance(config, dict) and "env" in config:  # RLlib env_config: {"env": {...}, "spec": {...}}
            spec = config.get("spec", spec)
            config = config["env"]
        if isinstance(config, dict):
            config = ProxyEnvConfig(**config)
        self.cfg = config or ProxyEnvConfig()
        self.cfg.check()
        if isinstance(spec, dict):
            spec = SpaceSpec.from_dict(spec) if "module_features" in spec else SpaceSpec(**spec)
        self.space_spec = spec or SpaceSpec()
        self.observation_space = self.space_spec.observation_space()
        self.action_space = self.space_spec.action_space()
        self.trainer = ProxyDPTrainer(self.cfg)
        self.reference_clips = (self.cfg.reference_clip,) * len(self.trainer.group_names)
        self._episode = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        ep_seed = int(self.np_random.integers(0, 2**31 - 1))
        self._episode += 1
        self.trainer.reset(seed=ep_seed)
        target = float(self.cfg.target_epsilons[int(self.np_random.integers(len(self.cfg.target_epsilons)))])
        self.guard = BudgetGuard(
            target_epsilon=target, delta=self.cfg.delta, sampling_rate=self.cfg.sampling_rate, steps=self.cfg.steps,
            stage="proxy",
        )
        self.initial_loss = self.trainer.validation_loss()
        self.prev_loss = self.initial_loss
        obs = initial_observation(self.guard.ledger_state(), spec=self.space_spec)
        return obs, {"target_epsilon": target}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        clips, sigma = self.space_spec.decode_action(
            action, reference_clips=self.reference_clips, sigma_floor=self.guard.floor()
        )
        eps_before = self.guard.epsilon_spent()
        released = None
        for _ in range(min(self.cfg.interval, self.guard.steps_left)):
            safe = self.guard.safe_action(clip_norms=clips, sigma=sigma)
            released = self.trainer.dp_step(
                step=self.guard.steps_done, clip_norms=safe.clip_norms, sigma=safe.noise_multiplier,
                sampling_rate=self.cfg.sampling_rate,
            )
            self.guard.record(self.guard.event(safe.noise_multiplier))
        loss = self.trainer.validation_loss()
        spent = self.guard.epsilon_spent() - eps_before
        reward = self.cfg.reward_scale * (self.prev_loss - loss) / self.initial_loss - self.cfg.privacy_penalty * (
            spent / self.guard.target_epsilon
        )
        validation = ValidationStats(loss=loss, previous_loss=self.prev_loss, initial_loss=self.initial_loss)
        self.prev_loss = loss
        obs = features_from_released(
            released, self.guard.ledger_state(), validation, spec=self.space_spec, reference_clips=self.reference_clips
        )
        done = self.guard.steps_left == 0
        info = {"validation_loss": loss, "epsilon": self.guard.epsilon_spent(), "sigma": self.guard.sigma_current}
        return obs, float(reward), done, False, info
