"""`python -m cbpo_orch` = the `cbpo-orch` command."""

from cbpo_orch.cli.main import main

if __name__ == "__main__":  # not when a spawned child process imports it
    main()
