"""Tests of the documentation generators in ``docs/_ext`` that run without Sphinx builds.

The generated pages (config tables, CLI help, API reference, source notes) come from
these functions, so their checks here fail fast in the test suite instead of only in
``sphinx-build``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

import masked_diffusion
from masked_diffusion.config import ExperimentConfig

# The generators import Sphinx, which comes with the docs extra, not the test extra.
pytest.importorskip("sphinx", reason="needs the docs extra: pip install -e '.[docs]'")

DOCS_EXT = Path(__file__).resolve().parents[1] / "docs" / "_ext"
sys.path.insert(0, str(DOCS_EXT))

import api_reference  # noqa: E402  (imported from docs/_ext, added to the path above)
import cli_reference  # noqa: E402
import config_reference  # noqa: E402
import source_notes  # noqa: E402
from sphinx.errors import ExtensionError  # noqa: E402

SECTIONS = [(field.name, field.default_factory) for field in dataclasses.fields(ExperimentConfig)]


@pytest.mark.parametrize(("section", "section_cls"), SECTIONS)
def test_config_table_lists_every_key(section: str, section_cls: type) -> None:
    rows = config_reference.config_rows(section_cls)
    keys = [key for key, _, _, _ in rows]
    assert keys == [field.name for field in dataclasses.fields(section_cls)]


@pytest.mark.parametrize(("section", "section_cls"), SECTIONS)
def test_config_table_meanings_nonempty(section: str, section_cls: type) -> None:
    empty = [key for key, _, _, meaning in config_reference.config_rows(section_cls) if not meaning]
    assert not empty, f"{section} keys without a meaning in the docstring: {empty}"


def test_config_table_rejects_undocumented_field() -> None:
    @dataclasses.dataclass
    class Partly:
        """Settings.

        Attributes:
            documented: A documented key.
        """

        documented: int = 1
        undocumented: int = 2

    message = r"keys without an Attributes entry \['undocumented'\]"
    with pytest.raises(ExtensionError, match=message):
        config_reference.config_rows(Partly)


def test_config_table_strips_default_sentence() -> None:
    rows = config_reference.config_rows(type(ExperimentConfig().data))
    by_key = {key: (type_text, default, meaning) for key, type_text, default, meaning in rows}
    type_text, default, meaning = by_key["batch_size"]
    assert type_text == "``int``"
    assert default == "``128``"
    assert "Default:" not in meaning


def test_cli_reference_covers_every_command() -> None:
    text = "\n".join(cli_reference.render_reference())
    for command in ("train", "sample", "evaluate", "impute"):
        assert f"``masked-diffusion {command}``" in text


def test_api_reference_covers_all() -> None:
    documented = [name for names in api_reference.public_names().values() for name in names]
    assert sorted(documented) == sorted(masked_diffusion.__all__)


def test_source_notes_collects_marks(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "module.py").write_text(
        "x = 1\n"
        "# NOTE: first line of the note\n"
        "# and its continuation.\n"
        "y = 2  # TODO: inline mark\n",
        encoding="utf-8",
    )
    notes = source_notes.collect_notes(package)
    assert notes == [
        ("pkg/module.py", 2, "NOTE", "first line of the note and its continuation."),
        ("pkg/module.py", 4, "TODO", "inline mark"),
    ]
