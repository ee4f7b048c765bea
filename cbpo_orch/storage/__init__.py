"""Storage: the registry database and the artifact store (the only code that touches them)."""
