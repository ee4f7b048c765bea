"""The C-BPO method: data, tasks, losses, reference point, prior (gamma), training and evaluation.

Knows nothing of Ray or the registry database."""
