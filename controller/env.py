"""A gymnasium environment of PROXY DP fine-tuning on PUBLIC text: where the controller learns at no privacy cost.

One episode = a short DP-SGD LoRA fine-tune of a tiny GPT-2 (byte-level, so no tokenizer build) on public
reviews, run by the REAL DP engine (trainers/engine): Poisson sampling at rate q, per-user gradients of every LoRA
module, group-wise clipping to C_k, isotropic Gaussian noise s_k = sigma * ||C||_2, division by the public
expected batch size q*N, Adam. Every
``interval`` DP steps the agent sets (C_k, sigma) for the next interval through the same spaces and the same budget
layer a private run uses, and is rewarded as a private run rewards it (controller/reward.py: the decrease of the
held-out public validation loss, or that gain per unit of the budget share spent), minus an optional penalty on
the epsilon spent. The episode's "private" texts are public, so the accounting inside an
episode costs nothing: it only teaches the agent how budgets behave.

The observation is built by :func:`controller.spaces.features_from_released` from a :class:`Released` record, as
in a private run: the agent never sees a per-example value even here, so what it learns transfers.

Domain shift: the base model pretrains (non-privately, once per env) on mixed-sentiment public reviews; the
fine-tune set is strongly positive reviews in one author's style, which the base model has not specialised to.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from controller.budget import BudgetGuard
from controller.config import ProxyEnvConfig
from controller.records import Released, ValidationStats
from controller.reward import reward_since
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


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (0: unchanged) inside, and restored after: an env must not
    change the thread count of the process that hosts it (a test session, a training driver)."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _SetPlan:
    """The engine-side policy of the proxy: plays the (C_k, sigma) the env decided and keeps the last release."""

    def __init__(self) -> None:
        self.clip_norms: tuple[float, ...] = ()
        self.sigma = 1.0
        self.released: Any = None

    def plan(self, step: int, groups: Any) -> Any:
        from trainers.engine.policy import StepPlan

        total = math.sqrt(sum(c * c for c in self.clip_norms))  # isotropic noise: sigma_eff = sigma
        return StepPlan(clip_norms=self.clip_norms, noise_stds=(self.sigma * total,) * len(self.clip_norms))

    def observe(self, released: Any) -> None:
        self.released = released


class ProxyDPTrainer:
    """A tiny GPT-2 + LoRA fine-tuned on public texts by the REAL DP engine (trainers/engine): each text is one
    "user", Poisson-sampled at rate q; per-user gradients, per-module clipping, noise, division by q*N."""

    def __init__(self, cfg: ProxyEnvConfig) -> None:
        self.cfg = cfg
        with torch_threads(cfg.threads):
            self._build(cfg)

    def _build(self, cfg: ProxyEnvConfig) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        from trainers.models.lora import add_lora

        torch.manual_seed(cfg.seed)
        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=max(cfg.seq_len, 16),
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=False,
            bos_token_id=EOS_BYTE,
            eos_token_id=EOS_BYTE,
        )
        base = GPT2LMHeadModel(config)
        self._pretrain_base(base)
        self.model = add_lora(
            base, r=cfg.lora_r, alpha=2.0 * cfg.lora_r, target_modules=tuple(cfg.lora_targets)
        )
        self.model.eval()  # no dropout anywhere; gradients still flow
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._init_std = {id(p): float(p.detach().std()) for p in self.params}
        self.train_ids = encode_bytes(
            public_texts(cfg.train_texts, seed=cfg.seed + 1, sentiment=0.9, one_style=True), cfg.seq_len
        )
        self.valid_ids = encode_bytes(
            public_texts(cfg.valid_texts, seed=cfg.seed + 2, sentiment=0.9, one_style=True), cfg.seq_len
        )
        self.policy = _SetPlan()
        self.events: list[Any] = []
        self.reset(seed=cfg.seed)

    def _pretrain_base(self, base: nn.Module) -> None:
        cfg = self.cfg
        if cfg.base_pretrain_steps > 0:
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
        """Fresh adapter (B = 0: the model starts at the base; A re-drawn per seed), optimizer, sampler, engine."""
        from trainers.engine.engine import DPEngine
        from trainers.engine.sampling import PoissonUserSampler

        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * self._init_std[id(p)])
                elif "lora_B" in name:
                    p.zero_()
        self.opt = torch.optim.Adam(self.params, lr=self.cfg.lr)
        n = self.train_ids.shape[0]
        self.sampler = PoissonUserSampler(n, sampling_rate=self.cfg.sampling_rate, seed=seed)
        self.engine = DPEngine(
            self.model,
            stage="proxy",
            sampling_rate=self.cfg.sampling_rate,
            num_users=n,
            seed=seed,
            policy=self.policy,
            event_sink=self.events.append,
            optimizer=self.opt,
            check_record_independence=False,  # byte LM, no cross-record ops: checked once in the engine's tests
        )
        self.group_names = tuple(g.name for g in self.engine.groups)
        self.previous_flat: list[Tensor] | None = None

    @torch.no_grad()
    def validation_loss(self) -> float:
        with torch_threads(self.cfg.threads):
            return float(self.model(input_ids=self.valid_ids, labels=self.valid_ids).loss)

    def dp_step(self, *, step: int, clip_norms: tuple[float, ...], sigma: float) -> tuple[Released, Any]:
        """One DP step on the engine (at ``cfg.threads`` threads); returns our Released record and the event."""
        with torch_threads(self.cfg.threads):
            return self._dp_step(step=step, clip_norms=clip_norms, sigma=sigma)

    def _dp_step(self, *, step: int, clip_norms: tuple[float, ...], sigma: float) -> tuple[Released, Any]:
        from controller.policy import released_from_engine
        from trainers.engine.engine import UserBatch
        from trainers.rlhf.sft import causal_lm_loss_per_record

        self.policy.clip_norms, self.policy.sigma = tuple(clip_norms), float(sigma)
        users = self.sampler.sample(step)  # [n] sampled texts ("users")
        x = self.train_ids[users]  # [n, T]
        batch = UserBatch(records={"input_ids": x, "loss_mask": torch.ones_like(x)}, user_ids=users)
        model = self.model

        def loss_fn(rec: dict[str, Tensor]) -> Tensor:  # [R] per-record mean next-token loss
            return causal_lm_loss_per_record(
                model(input_ids=rec["input_ids"]).logits, rec["input_ids"], rec["loss_mask"]
            )

        result = self.engine.step(batch, loss_fn)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        record, self.previous_flat = released_from_engine(
            result.released, previous=self.previous_flat, event=result.event
        )
        return record, result.event


class ProxyDPEnv(gym.Env):
    """gymnasium Env: one decision (clip thresholds per depth bucket + sigma) per ``interval`` DP steps.

    Args:
        config: the proxy episode (a :class:`ProxyEnvConfig` or its dict, as RLlib passes env_config).
        spec: the spaces (a :class:`SpaceSpec` or its dict).
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self, config: ProxyEnvConfig | dict | None = None, spec: SpaceSpec | dict | None = None
    ) -> None:
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
            target_epsilon=target,
            delta=self.cfg.delta,
            sampling_rate=self.cfg.sampling_rate,
            steps=self.cfg.steps,
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
        start = self.guard.mark()
        released = None
        for _ in range(min(self.cfg.interval, self.guard.steps_left)):
            safe = self.guard.safe_action(clip_norms=clips, sigma=sigma)
            released, event = self.trainer.dp_step(
                step=self.guard.steps_done,
                clip_norms=safe.clip_norms,
                sigma=safe.noise_multiplier * (1 + 1e-9),
            )
            self.guard.record(event)  # the engine's own event: sigma_eff recomputed from (C_k, s_k)
        loss = self.trainer.validation_loss()
        reward = reward_since(
            start, self.guard, config=self.cfg, previous_loss=self.prev_loss, loss=loss, initial_loss=self.initial_loss
        )
        validation = ValidationStats(loss=loss, previous_loss=self.prev_loss, initial_loss=self.initial_loss)
        self.prev_loss = loss
        obs = features_from_released(
            released,
            self.guard.ledger_state(),
            validation,
            spec=self.space_spec,
            reference_clips=self.reference_clips,
        )
        done = self.guard.steps_left == 0
        info = {
            "validation_loss": loss,
            "epsilon": self.guard.epsilon_spent(),
            "sigma": self.guard.sigma_current,
        }
        return obs, float(reward), done, False, info
