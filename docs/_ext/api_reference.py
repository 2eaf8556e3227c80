"""Sphinx directive ``public-api``: autodoc entries for every name in ``__all__``.

Names are grouped by the module that defines them (modules in the order of
``MODULE_TITLES``, names in the order of ``masked_diffusion.__all__``), so a name
added to ``__all__`` appears in the reference without editing the page.
"""

from __future__ import annotations

import inspect
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

MODULE_TITLES = {
    "masked_diffusion.config": "Configuration",
    "masked_diffusion.schedule": "Masking schedules",
    "masked_diffusion.network": "Denoising network",
    "masked_diffusion.diffusion": "Diffusion model",
    "masked_diffusion.samplers": "Samplers",
    "masked_diffusion.data": "Data",
    "masked_diffusion.trainer": "Training",
    "masked_diffusion.checkpoint": "Checkpoints",
    "masked_diffusion.images": "Images",
    "masked_diffusion.metrics": "Metrics",
    "masked_diffusion.distributed": "Distributed training",
    "masked_diffusion.cli": "Command line",
}


def _kind(obj: object) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if callable(obj):
        return "function"
    return "data"


def public_names() -> dict[str, list[str]]:
    """Map each defining module to the public names it defines, in ``__all__`` order."""
    import masked_diffusion

    groups: dict[str, list[str]] = {}
    for name in masked_diffusion.__all__:
        obj = getattr(masked_diffusion, name)
        module = getattr(obj, "__module__", None) if _kind(obj) != "data" else None
        if not module or not module.startswith("masked_diffusion"):
            module = "masked_diffusion"
        groups.setdefault(module, []).append(name)
    order = list(MODULE_TITLES)
    return dict(
        sorted(groups.items(), key=lambda item: order.index(item[0]) if item[0] in order else 99)
    )


def render_reference() -> list[str]:
    """Render one section per defining module with one autodoc directive per name."""
    import masked_diffusion

    out: list[str] = []
    for module, names in public_names().items():
        title = MODULE_TITLES.get(module, "Package")
        out += [title, "-" * len(title), ""]
        if module != "masked_diffusion":
            out += [f"Defined in ``{module}``, importable from ``masked_diffusion``.", ""]
        for name in names:
            kind = _kind(getattr(masked_diffusion, name))
            out.append(f".. auto{kind}:: masked_diffusion.{name}")
            out.append("")
    return out


class PublicApi(SphinxDirective):
    """Insert the generated API reference."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        container = nodes.section()
        container.document = self.state.document
        text = StringList(render_reference(), source="public-api")
        nested_parse_with_titles(self.state, text, container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("public-api", PublicApi)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
