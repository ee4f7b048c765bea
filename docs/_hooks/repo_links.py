"""MkDocs hook: links from a docs page to repository files outside ``docs/``.

The guides link to files beside them in the repository (``../deploy/README.md``,
``../bench/results/….md``), so that the links work where the Markdown is read on a forge. MkDocs
only knows the pages under ``docs/``, so this hook checks each such link itself: a link to a
file that does not exist, or outside the repository, is a warning (an error under ``--strict``).
An existing target becomes a link to the file in the repository when ``repo_url`` is set, else
plain text naming the path (the site does not carry the repository's files).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repo_links")

_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]+)\]\((?P<target>[^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _absolute(path) -> Path:
    """``path`` made absolute and normal, without following symbolic links."""
    return Path(os.path.normpath(os.path.abspath(path)))


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs = _absolute(config["docs_dir"])
    root = _absolute(config["config_file_path"]).parent
    here = _absolute(page.file.abs_src_path).parent
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def outside(match: re.Match) -> str:
        text, target = match["text"], match["target"]
        if _SCHEME.match(target) or target.startswith(("#", "/")):
            return match[0]
        path = target.split("#", 1)[0]
        resolved = _absolute(here / path)
        if resolved == docs or docs in resolved.parents:
            return match[0]  # a page of the site: MkDocs checks it
        where = f"Doc file '{page.file.src_path}'"
        if root != resolved and root not in resolved.parents:
            log.warning(f"{where} links to '{target}', outside the repository")
            return match[0]
        if not resolved.exists():
            log.warning(f"{where} links to '{target}', which names no file in the repository")
            return match[0]
        relative = resolved.relative_to(root).as_posix()
        if repo_url:
            kind = "tree" if resolved.is_dir() else "blob"
            return f"[{text}]({repo_url}/{kind}/main/{relative})"
        return text if relative in text else f"{text} (`{relative}`)"

    out, fenced = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
        out.append(line if fenced else _LINK.sub(outside, line))
    return "\n".join(out)
