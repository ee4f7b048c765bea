"""`python -m cbpo_orch` = the `cbpo-orch` command."""

from cbpo_orch.cli.main import main

main()
