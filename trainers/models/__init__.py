"""Models: tokenizer, GPT-2-architecture base model, LoRA adapters (peft), save/load.

Public API (heavy imports stay inside the functions' modules; import the submodule you need):
  * ``trainers.models.tokenizer``: ``train_tokenizer``, ``load_tokenizer``, ``padding_side``, ``EOT``;
  * ``trainers.models.base``: ``ensure_base_model`` (cached build) -> ``BaseModelInfo``, ``load_base_model``
    (the only way a stage opens a base model: ``from_pretrained``), ``build_base_model``;
  * ``trainers.models.lora``: ``add_lora``, ``lora_groups`` (clipping groups), ``assert_trainable_lora``,
    ``merge_and_save``, ``load_lora`` (sampling: ``trainers.rollout.generate_continuations``).
"""
