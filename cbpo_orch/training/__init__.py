"""Models and the loops over them: loading, encoding, the multi-user LoRA trainer, the task
adapter, generation and scoring. Knows nothing of Ray or the registry database."""
