"""Workers: plain functions that personalize one user (callable with or without Ray)."""
