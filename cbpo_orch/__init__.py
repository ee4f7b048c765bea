"""cbpo-orch: per-user LoRA personalization with C-BPO, orchestrated over Ray."""

__version__ = "0.1.0"
