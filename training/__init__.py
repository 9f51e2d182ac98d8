"""training: tasks, tokenizer, data synthesis, tiny models, pretraining and SFT."""
