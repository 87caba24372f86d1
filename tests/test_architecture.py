"""The engine's shape: dependencies run one way, no module imports in a cycle, no ComfyUI inside.

Layers, lowest first: the root leaf modules (`progress.py`), then models / video / flow (what a clip and a
model are), then attention (the mechanism), then sampling (the loop, starts, chunks, inversion), then methods
(one module per paper). A module may import its own layer or lower ones, never a higher one; every import
counts, also one inside a function (a lazy import still runs one way or the other).
"""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "pipelines_core"
PACKAGE = "comfyui_video_edit.pipelines_core"
LAYERS = {"": 0, "models": 1, "video": 1, "flow": 1, "attention": 2, "sampling": 3, "methods": 4}
FOREIGN = ("comfy", "folder_paths", "server", "nodes", "execution", "comfyui_video_edit.nodes",
           "comfyui_video_edit.headless")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def imports_of(path: Path) -> set:
    """Every module of pipelines_core that `path` imports (absolute names), and every foreign top-level name."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    modules = {module_name(p) for p in CORE.rglob("*.py")}
    return {name for name in found if name in modules or not name.startswith(PACKAGE)}


def layer(module: str) -> int:
    first = module[len(PACKAGE) + 1:].split(".")[0] if module != PACKAGE else ""
    return LAYERS[first if (CORE / first).is_dir() and first else ""]


SOURCES = sorted(CORE.rglob("*.py"))
GRAPH = {module_name(p): imports_of(p) for p in SOURCES}


def test_every_engine_package_has_a_layer():
    for module in GRAPH:
        layer(module)  # KeyError: a new package must be placed in LAYERS


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_down_the_layers(module):
    upward = [target for target in GRAPH[module] if target.startswith(PACKAGE) and layer(target) > layer(module)]
    assert not upward, f"{module} (layer {layer(module)}) imports upward: {upward}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_the_engine_never_imports_comfyui_or_the_nodes(module):
    foreign = [t for t in GRAPH[module] if not t.startswith(PACKAGE) and t.split(".")[0] in FOREIGN
               or t.startswith(FOREIGN[-2:])]
    assert not foreign, f"{module} imports {foreign}"


def test_no_import_cycle():
    internal = {m: {t for t in targets if t in GRAPH and t != m} for m, targets in GRAPH.items()}
    # a package's __init__ is imported by its modules' import machinery, not by their code: edges only
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(internal[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(internal):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_check_sees_a_planted_upward_import(tmp_path):
    """The layer test must be able to fail: a models module importing sampling is caught."""
    planted = CORE / "models" / "_planted_for_test.py"
    planted.write_text("from ..sampling.hooks import Hooks\n")
    try:
        targets = imports_of(planted)
    finally:
        planted.unlink()
    assert any(layer(t) > layer(module_name(planted)) for t in targets if t.startswith(PACKAGE))


def test_every_method_lives_in_a_module_named_for_its_paper():
    methods = {p.stem for p in (CORE / "methods").glob("*.py")} - {"__init__"}
    for paper in ("fatezero", "plug_and_play", "tokenflow", "pix2video", "rerender", "controlvideo",
                  "text2video_zero", "prompt_to_prompt"):
        assert paper in methods


def test_the_readme_library_example_imports_what_exists():
    """The README's "As a library" snippet names real modules and names (its import lines run)."""
    readme = (CORE.parent / "README.md").read_text()
    snippet = readme.split("### As a library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    imports = [line for line in snippet.splitlines() if line.startswith(("from ", "import "))]
    assert imports
    exec("\n".join(imports), {})
