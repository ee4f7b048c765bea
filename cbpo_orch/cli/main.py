"""``cbpo-orch``: the command line entry point."""

from __future__ import annotations

import sys

import typer

from cbpo_orch.cli import job_commands, user_commands  # noqa: F401  (they register their commands)
from cbpo_orch.cli import lifecycle_commands, serve_commands  # noqa: F401
from cbpo_orch.cli.app import USER_ERRORS, app


def main() -> None:
    try:
        app()
    except USER_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
