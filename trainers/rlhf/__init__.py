"""The math of the three private alignment stages (Wu et al. 2023), as small components the stage recipes call.

Every loss here is PER RECORD: it returns one value per record, shape [R], with no reduction and no statistic
shared across records. The DP engine sums per-record gradients per user and clips each user's sum, so a loss
that mixed records (a batch mean, batch-wide whitening, batch norm) would let one user's data move another
user's clipped contribution and void the sensitivity bound (docs/design.md section 2).

Modules:
    sft         tokenization of (prompt, response) pairs, response-token mask, per-record causal LM loss.
    reward      Bradley-Terry per-record loss and pairwise accuracy.
    heads       last-token index, position ids from padding, the score model and the policy-with-value-head.
    ppo         log-probs, per-token KL, token rewards, per-trajectory GAE, user-safe advantage normalization,
                the clipped PPO per-record loss, KL controllers.
    experience  the rollout record (`Experience`), the pure function that builds it from model outputs, and
                `ppo_loss_on_experience`, the per-record loss a DP-PPO step hands to the engine.
    config      `PPOObjectiveConfig`: the hyperparameters of the PPO objective, validated at load time.
"""
