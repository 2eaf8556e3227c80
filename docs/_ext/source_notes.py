"""Sphinx directive ``source-notes``: every ``NOTE:`` and ``TODO:`` comment of the package.

Known gaps are marked in the source where they sit. This directive lists them with
their file and line, so the limitations page stays in step with the code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

_MARK = re.compile(r"#\s*(NOTE|TODO):\s*(.*)$")
_CONTINUATION = re.compile(r"^\s*#\s?(.*)$")


def collect_notes(package_dir: Path) -> list[tuple[str, int, str, str]]:
    """Return ``(relative path, line number, mark, text)`` of every marked comment.

    A mark's text continues over the directly following comment lines, up to a blank
    comment line or a line that is not a comment.
    """
    notes = []
    for path in sorted(package_dir.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for index, line in enumerate(lines):
            match = _MARK.search(line)
            if not match:
                continue
            parts = [match.group(2).strip()]
            for follow in lines[index + 1 :]:
                more = _CONTINUATION.match(follow)
                if not more or not more.group(1).strip() or _MARK.search(follow):
                    break
                parts.append(more.group(1).strip())
            relative = path.relative_to(package_dir.parent).as_posix()
            notes.append((relative, index + 1, match.group(1), " ".join(parts)))
    return notes


class SourceNotes(SphinxDirective):
    """Insert a bullet list of the marked comments in ``src/masked_diffusion``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        import masked_diffusion

        package_dir = Path(masked_diffusion.__file__).resolve().parent
        notes = collect_notes(package_dir)
        for path in package_dir.rglob("*.py"):
            self.env.note_dependency(str(path))
        if not notes:
            lines = ["The source currently has no ``NOTE:`` or ``TODO:`` marks."]
        else:
            lines = [f"- ``{path}:{line}`` ({mark}): {text}" for path, line, mark, text in notes]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="source-notes"), 0, container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("source-notes", SourceNotes)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
