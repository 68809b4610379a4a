"""mkdocs hook: builds the configuration reference into docs/configuration.md.

The page holds the prose; the marker below is replaced at build time by the tables
`simulations.config_reference.render()` generates from the typed schema (fedkd/config/,
every registered strategy's and mitigation's Params, conf/'s groups), so the reference
cannot drift from the code.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

MARKER = "<!-- config-reference -->"
ROOT = Path(__file__).resolve().parents[2]


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the repository's own fedkd, strategies, simulations
    with warnings.catch_warnings():  # third-party deprecations on import (Flower's CLI)
        warnings.simplefilter("ignore", DeprecationWarning)
        from simulations.config_reference import render

        return markdown.replace(MARKER, render())
