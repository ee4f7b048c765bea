"""Serving a job's adapters: export for vLLM / Ray Serve LLM, and cbpo-orch's own Ray Serve application."""
