"""Models: tokenizer, GPT-2-architecture base model, LoRA adapters (peft), save/load."""
