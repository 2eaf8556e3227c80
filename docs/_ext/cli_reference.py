"""Sphinx directive ``cli-reference``: the ``--help`` text of every CLI command.

The text comes from :func:`masked_diffusion.cli.build_parser` at build time, at a
fixed width of 88 columns, so the page always matches the installed command.
"""

from __future__ import annotations

import argparse
import inspect
import os
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

HELP_WIDTH = 88


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render_reference() -> list[str]:
    """Render the main help and one section per command as reStructuredText."""
    from masked_diffusion.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)
    try:
        parser = build_parser()
        blocks = [("masked-diffusion", parser.format_help())]
        blocks += [
            (f"masked-diffusion {name}", sub.format_help())
            for name, sub in _subcommands(parser).items()
        ]
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous

    out: list[str] = []
    for title, help_text in blocks:
        heading = f"``{title}``"
        out += [heading, "~" * len(heading), "", ".. code-block:: text", ""]
        out += [f"   {line}".rstrip() for line in help_text.rstrip().splitlines()]
        out.append("")
    return out


class CliReference(SphinxDirective):
    """Insert the generated command reference."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from masked_diffusion import cli

        self.env.note_dependency(inspect.getfile(cli))
        container = nodes.section()
        container.document = self.state.document
        text = StringList(render_reference(), source="cli-reference")
        nested_parse_with_titles(self.state, text, container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("cli-reference", CliReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
