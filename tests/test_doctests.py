"""Run the docstring examples of every module of the package, and require them.

Each module's ``>>>`` examples run with :mod:`doctest` in a temporary working
folder, so examples that write files leave nothing behind. Every public class and
function (``masked_diffusion.__all__``, exceptions aside) must have an ``Example:``
section with at least one ``>>>`` line.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import masked_diffusion

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(masked_diffusion.__path__, prefix="masked_diffusion.")
    if info.name != "masked_diffusion.__main__"
)
OPTION_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("module_name", ["masked_diffusion", *MODULES])
def test_module_doctests(module_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTION_FLAGS)
    for test in finder.find(module, module_name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} doctest example(s) failed in {module_name}"


def _public_documented_objects() -> list[str]:
    names = []
    for name in masked_diffusion.__all__:
        obj = getattr(masked_diffusion, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            names.append(name)
    return names


@pytest.mark.parametrize("name", _public_documented_objects())
def test_public_docstring_has_example(name: str) -> None:
    doc = inspect.getdoc(getattr(masked_diffusion, name)) or ""
    assert "Example" in doc, f"masked_diffusion.{name} has no Example section in its docstring"
    assert ">>>" in doc, f"masked_diffusion.{name}'s docstring has no >>> example line"
