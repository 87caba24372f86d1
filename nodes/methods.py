"""Method nodes: one node per paper, each declared in a `method_<name>.py` file beside this one.

A method registers itself with that file alone: it defines the node class and `METHOD = MethodNode(...)`
(the node, its display name, the paper, a one-line mechanism, the workflows in workflows/ that use it).
`discover()` imports every such file; the pack's NODE_CLASS_MAPPINGS, `video-edit nodes` and the README's
Methods table (`video-edit nodes --methods`) all come from what it finds. Adding a method = its engine module
in pipelines_core/methods/, its `method_<name>.py` here, its workflow in workflows/ and its test; nothing else
names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

PREFIX = "method_"  # nodes/method_<name>.py: one method's node declaration

INVERSION = ("VE_INVERSION", {"tooltip": "From DDIM Invert."})
FRACTION = {"min": 0.0, "max": 1.0, "step": 0.01}


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str  # "Qi et al."
    venue: str  # "ICCV 2023"
    url: str

    def cite(self) -> str:
        return f"{self.authors}, {self.venue}"


@dataclass(frozen=True)
class MethodNode:
    """One method's node: what ComfyUI registers and what the Methods table shows."""

    name: str  # the method as its paper names it: "FateZero"
    display_name: str  # the node's title in ComfyUI
    node: type  # the V1 node class; its class name is the node id
    paper: Paper
    mechanism: str  # one line: what the method does to the sampler
    # The file names in workflows/ whose graph uses this node: ("fatezero_edit.json", "video_p2p_edit.json").
    # Empty by default only so a node declared before its workflow still registers; a test asks for one.
    workflows: tuple = ()

    def __post_init__(self):
        for text in (self.name, self.display_name, self.mechanism, self.paper.title, self.paper.cite()):
            if "|" in text or "\n" in text:
                raise ValueError(f"{self.name}: {text!r} would break its Methods table row (no '|' or newline)")
        if not isinstance(self.workflows, tuple) or not all(
                isinstance(w, str) and w.endswith(".json") and "/" not in w and "|" not in w for w in self.workflows):
            raise ValueError(f"{self.name}: workflows must be a tuple of file names in workflows/ "
                             f"(\"<name>.json\"), got {self.workflows!r}")

    @property
    def node_id(self) -> str:
        return self.node.__name__


class InjectorNode:
    """What every Attention Injector node shares: DDIM Invert's inversion in, a VE_INJECTION out."""

    CATEGORY = "video edit/inversion"
    RETURN_TYPES = ("VE_INJECTION",)
    RETURN_NAMES = ("injection",)
    OUTPUT_TOOLTIPS = ("The injection, for the Cross-Frame Sampler (with the same inversion).",)
    FUNCTION = "build"


def discover() -> tuple[MethodNode, ...]:
    """The METHOD of every `method_*.py` beside this file, in file-name order."""
    methods = []
    for found in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if not found.name.startswith(PREFIX):
            continue
        method = getattr(importlib.import_module(f".{found.name}", __package__), "METHOD", None)
        if not isinstance(method, MethodNode):
            raise TypeError(f"nodes/{found.name}.py must declare METHOD = MethodNode(...)")
        methods.append(method)
    for field in ("node_id", "name", "display_name"):
        values = [getattr(m, field) for m in methods]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"two method nodes share the {field} {', '.join(repeated)}")
    return tuple(methods)


def markdown_table(methods) -> str:
    """The README's Methods table (`video-edit nodes --methods` prints it)."""
    rows = ["| node | paper | mechanism | workflow |", "|---|---|---|---|"]
    for m in methods:
        rows.append(f"| **{m.display_name}** (`{m.node_id}`) | [{m.paper.title}]({m.paper.url}) "
                    f"({m.paper.cite()}) | {m.mechanism} | {', '.join(f'`{w}`' for w in m.workflows) or '-'} |")
    return "\n".join(rows)
