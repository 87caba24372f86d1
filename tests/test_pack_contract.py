"""The pack loads the way ComfyUI loads a custom-node folder, and every node honours the node contract."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]
CORE_TYPES = {"IMAGE", "MASK", "LATENT", "AUDIO", "VIDEO", "MODEL", "CLIP", "VAE", "STRING", "INT", "FLOAT", "BOOLEAN"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.fixture(scope="module")
def pack():
    """Import the folder as ComfyUI does: from its __init__.py, under a name made from its path."""
    name = str(PACK).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py", submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def test_exports(pack):
    assert pack.NODE_CLASS_MAPPINGS and set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    assert (PACK / pack.WEB_DIRECTORY).is_dir()


def iter_inputs(cls):
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            yield name, entry


def test_node_contract(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("VE_"), node_id
        assert isinstance(cls.RETURN_TYPES, tuple)
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert cls.CATEGORY.startswith("video edit/"), node_id
        assert cls.DESCRIPTION.strip(), node_id
        if hasattr(cls, "RETURN_NAMES"):
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
        for t in cls.RETURN_TYPES:
            assert t in CORE_TYPES or t.startswith("VE_"), (node_id, t)
        for name, entry in iter_inputs(cls):
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, list):
                if "default" in options:
                    assert options["default"] in kind, f"{node_id}.{name} default not among its choices"
            elif kind in ("INT", "FLOAT"):
                default = options["default"]
                assert options.get("min", default) <= default <= options.get("max", default), f"{node_id}.{name}"
            elif kind not in WIDGET_TYPES:
                assert kind in CORE_TYPES or kind.startswith("VE_"), (node_id, name, kind)


def test_function_signature_accepts_every_input(pack):
    import inspect

    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue  # ComfyUI passes inputs by name: **kwargs takes them all (a subclass node passing them on)
        for name, _ in iter_inputs(cls):
            assert name in params, f"{node_id}.{cls.FUNCTION} does not take {name}"


def python_files(folder):
    return [p for p in (PACK / folder).rglob("*.py")]


def test_engine_never_imports_comfyui():
    for path in python_files("pipelines_core"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for n in names:
                assert not n.startswith(("comfy", "folder_paths", "server", "nodes")), f"{path.name} imports {n}"


def test_pack_imports_are_relative():
    """ComfyUI has its own top-level `nodes` module and imports us under a path-derived name."""
    own = {"nodes", "pipelines_core", "headless", "comfyui_video_edit"}
    for folder in ("nodes", "pipelines_core"):
        for path in python_files(folder):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    assert node.module.split(".")[0] not in own, f"{path.name}: absolute import of {node.module}"
                if isinstance(node, ast.Import):
                    for a in node.names:
                        assert a.name.split(".")[0] not in own, f"{path.name}: absolute import of {a.name}"


def test_file_nodes_change_their_cache_key_when_the_file_changes(pack, tmp_path):
    import shutil

    clip = tmp_path / "clip.mp4"
    shutil.copy(PACK / "assets" / "sample_pan.mp4", clip)
    load_video = pack.NODE_CLASS_MAPPINGS["VE_LoadVideo"]
    before = load_video.IS_CHANGED(video=str(clip), frame_cap=4)
    assert before == load_video.IS_CHANGED(video=str(clip), frame_cap=4)
    clip.write_bytes(clip.read_bytes() + b"\0")
    assert load_video.IS_CHANGED(video=str(clip), frame_cap=4) != before
