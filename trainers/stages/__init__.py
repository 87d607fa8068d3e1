"""The three private alignment stages (DP-SFT, DP reward model, DP-PPO) and their configs.

Modules:
    config   typed config dataclasses of each stage (privacy, LoRA, engine, SFT, RM, PPO, evaluation) and the
             preset table (which stages are private and why). Imports without torch except through the PPO
             objective's config (``trainers.rlhf.config``).
"""
