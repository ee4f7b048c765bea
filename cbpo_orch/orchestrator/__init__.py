"""Orchestrator: schedules per-user work over Ray; the driver alone writes the registry."""
