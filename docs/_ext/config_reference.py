"""Sphinx directive ``config-reference``: tables of every config key, from the dataclasses.

Each section of :class:`masked_diffusion.ExperimentConfig` becomes a table of its keys
with the annotated type, the default and the meaning. The meaning is the entry of the
class docstring's ``Attributes:`` section without its closing ``Default: ...``
sentence, and the default is read from the dataclass field itself. A field without a
docstring entry, or an entry without a field, stops the build, so the tables cannot
drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

_ENTRY = re.compile(r"^(\w+): ?(.*)$")
_DEFAULT_SENTENCE = re.compile(r"\s*Default: .*$", re.DOTALL)


def attribute_docs(cls: type) -> dict[str, str]:
    """Parse the ``Attributes:`` section of a Google-style class docstring.

    Returns:
        Attribute name to its description, continuation lines joined with spaces.
    """
    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    try:
        start = lines.index("Attributes:") + 1
    except ValueError:
        return {}
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        if line.startswith("    ") and not line.startswith("     "):
            match = _ENTRY.match(line[4:])
            if match:
                current = entries.setdefault(match.group(1), [])
                current.append(match.group(2))
                continue
        if current is not None and line.strip():
            current.append(line.strip())
    return {name: " ".join(parts) for name, parts in entries.items()}


def _format_default(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "``null``"
    if isinstance(value, bool):
        return f"``{str(value).lower()}``"
    if isinstance(value, tuple):
        return "``[" + ", ".join(str(item) for item in value) + "]``"
    if isinstance(value, str):
        return f'``"{value}"``'
    return f"``{value!r}``"


def config_rows(section_cls: type) -> list[tuple[str, str, str, str]]:
    """Return ``(key, type, default, meaning)`` for every field of a config section.

    Raises:
        ExtensionError: If a field has no docstring entry or an entry names no field.
    """
    docs = attribute_docs(section_cls)
    fields = dataclasses.fields(section_cls)  # type: ignore[arg-type]
    names = [field.name for field in fields]
    undocumented = [name for name in names if name not in docs]
    stale = [name for name in docs if name not in names]
    if undocumented or stale:
        raise ExtensionError(
            f"{section_cls.__name__}: keys without an Attributes entry {undocumented}, "
            f"Attributes entries without a key {stale}; update the class docstring"
        )
    rows = []
    for field in fields:
        meaning = _DEFAULT_SENTENCE.sub("", docs[field.name]).strip()
        rows.append((field.name, f"``{field.type}``", _format_default(field), meaning))
    return rows


def _section_classes() -> list[tuple[str, type]]:
    from masked_diffusion.config import ExperimentConfig

    return [
        (field.name, field.default_factory)  # type: ignore[misc]
        for field in dataclasses.fields(ExperimentConfig)
    ]


def render_reference() -> list[str]:
    """Render every section as reStructuredText: a heading, a summary and a table."""
    out: list[str] = []
    for section, cls in _section_classes():
        title = f"``{section}`` section"
        summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        out += [title, "~" * len(title), "", summary, ""]
        out += [f"Python class: :class:`masked_diffusion.{cls.__name__}`.", ""]
        out += [".. list-table::", "   :header-rows: 1", "   :widths: 18 16 14 52", ""]
        out += ["   * - Key", "     - Type", "     - Default", "     - Meaning"]
        for key, type_text, default, meaning in config_rows(cls):
            out += [
                f"   * - ``{section}.{key}``",
                f"     - {type_text}",
                f"     - {default}",
                f"     - {meaning}",
            ]
        out.append("")
    return out


class ConfigReference(SphinxDirective):
    """Insert the generated config tables."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(inspect.getfile(_section_classes()[0][1]))
        container = nodes.section()
        container.document = self.state.document
        text = StringList(render_reference(), source="config-reference")
        nested_parse_with_titles(self.state, text, container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("config-reference", ConfigReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
