"""Pin the public API: the names in ``masked_diffusion.__all__`` and their signatures.

The snapshot ``tests/public_api.json`` records, for every public name, its kind and
signature, and the signatures and kinds of the public methods and properties that each
public class defines itself. A change to any of them fails this test until the
snapshot is regenerated, so API changes are always deliberate and recorded:

    python tests/test_public_api.py --update

Annotations are compared as written in the source (the package uses
``from __future__ import annotations``), so the snapshot does not depend on the
Python version.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import masked_diffusion

SNAPSHOT = Path(__file__).with_name("public_api.json")
UPDATE_HINT = (
    "If the change is intended, regenerate the snapshot with "
    "`python tests/test_public_api.py --update` and record the change in CHANGELOG.md "
    "under [Unreleased]."
)


def _annotation(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return inspect.formatannotation(annotation)


def format_signature(obj: Any) -> str:
    """Render a signature as ``(name: annotation = default, *, ...) -> annotation``."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return "<no signature>"
    parts = []
    previous_kind = None
    for parameter in signature.parameters.values():
        kind = parameter.kind
        if kind is inspect.Parameter.KEYWORD_ONLY and previous_kind not in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            parts.append("*")
        if previous_kind is inspect.Parameter.POSITIONAL_ONLY and kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
        ):
            parts.append("/")
        text = parameter.name
        if kind is inspect.Parameter.VAR_POSITIONAL:
            text = "*" + text
        elif kind is inspect.Parameter.VAR_KEYWORD:
            text = "**" + text
        if parameter.annotation is not inspect.Parameter.empty:
            text += f": {_annotation(parameter.annotation)}"
        if parameter.default is not inspect.Parameter.empty:
            text += f" = {parameter.default!r}"
        parts.append(text)
        previous_kind = kind
    if previous_kind is inspect.Parameter.POSITIONAL_ONLY:
        parts.append("/")
    result = "(" + ", ".join(parts) + ")"
    if signature.return_annotation is not inspect.Signature.empty:
        result += f" -> {_annotation(signature.return_annotation)}"
    return result


def _class_members(cls: type) -> dict[str, str]:
    """Public methods and properties that ``cls`` defines itself (not inherited)."""
    members = {}
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property):
            members[name] = "property"
        elif isinstance(value, classmethod):
            members[name] = "classmethod " + format_signature(value.__func__)
        elif isinstance(value, staticmethod):
            members[name] = "staticmethod " + format_signature(value.__func__)
        elif inspect.isfunction(value):
            members[name] = "method " + format_signature(value)
    return dict(sorted(members.items()))


def describe_api() -> dict[str, Any]:
    """Return the current public API in the snapshot's format."""
    entries: dict[str, Any] = {}
    for name in sorted(masked_diffusion.__all__):
        obj = getattr(masked_diffusion, name)
        if inspect.isclass(obj):
            kind = "exception" if issubclass(obj, BaseException) else "class"
            bases = [base.__name__ for base in obj.__bases__]
            entries[name] = {
                "kind": kind,
                "bases": bases,
                "signature": format_signature(obj),
                "members": _class_members(obj),
            }
        elif callable(obj):
            entries[name] = {"kind": "function", "signature": format_signature(obj)}
        else:
            entries[name] = {"kind": "data", "type": type(obj).__name__}
    return {"__all__": sorted(masked_diffusion.__all__), "api": entries}


def _dump(api: dict[str, Any]) -> str:
    return json.dumps(api, indent=2, sort_keys=True) + "\n"


def _example(a: int, /, b: str = "x", *args: float, c: bool = False, **kwargs: int) -> None:
    """A function with every parameter kind, for the signature renderer."""


def _keyword_only(a: int, *, b: int = 1) -> int:
    return a + b


def test_format_signature_every_kind() -> None:
    expected = "(a: int, /, b: str = 'x', *args: float, c: bool = False, **kwargs: int) -> None"
    assert format_signature(_example) == expected


def test_format_signature_keyword_only() -> None:
    assert format_signature(_keyword_only) == "(a: int, *, b: int = 1) -> int"


def test_all_unique() -> None:
    names = list(masked_diffusion.__all__)
    assert len(names) == len(set(names)), f"duplicate names in __all__: {names}"


def test_all_names_importable() -> None:
    missing = [name for name in masked_diffusion.__all__ if not hasattr(masked_diffusion, name)]
    assert not missing, f"names in __all__ that masked_diffusion does not define: {missing}"


def test_public_api_matches_snapshot() -> None:
    assert SNAPSHOT.is_file(), f"missing snapshot {SNAPSHOT}. {UPDATE_HINT}"
    expected = SNAPSHOT.read_text(encoding="utf-8")
    actual = _dump(describe_api())
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile="tests/public_api.json (snapshot)",
                tofile="current masked_diffusion API",
            )
        )
        raise AssertionError(f"the public API changed:\n{diff}\n{UPDATE_HINT}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check or regenerate tests/public_api.json.")
    parser.add_argument(
        "--update", action="store_true", help="write the current API to the snapshot file"
    )
    args = parser.parse_args(argv)
    actual = _dump(describe_api())
    if args.update:
        SNAPSHOT.write_text(actual, encoding="utf-8")
        print(f"wrote {SNAPSHOT}")
        return 0
    if SNAPSHOT.is_file() and SNAPSHOT.read_text(encoding="utf-8") == actual:
        print("public API matches the snapshot")
        return 0
    print(f"public API differs from the snapshot. {UPDATE_HINT}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
