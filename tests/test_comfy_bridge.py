"""The pack inside a ComfyUI process: folders, tokenizer, progress and device come from ComfyUI's modules.

ComfyUI's `comfy` is a namespace package (a folder with no __init__.py), so `comfy.__file__` is None:
the first real run failed on it in every graph. These tests lay out a ComfyUI tree on disk the same way
and import the pack into a fresh process as ComfyUI does (after `folder_paths` and
`comfy.model_management`). With COMFYUI_PATH pointing at a real ComfyUI checkout they run against it too.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]

# The parts of ComfyUI's public modules the bridge uses, with their real signatures and behaviour
# (folder_paths.get_full_path returns None for an unknown file; get_filename_list raises for an unknown kind).
COMFY_TREE = {
    "folder_paths.py": """
        import os
        base_path = os.path.dirname(os.path.realpath(__file__))
        models_dir = os.path.join(base_path, "models")
        folder_names_and_paths = {k: ([os.path.join(models_dir, k)], set()) for k in
                                  ("checkpoints", "loras", "controlnet", "diffusers", "diffusion_models", "vae",
                                   "text_encoders")}
        def get_folder_paths(name):
            return folder_names_and_paths[name][0][:]
        def get_filename_list(name):
            out = []
            for root in folder_names_and_paths[name][0]:
                for dirpath, _, files in os.walk(root):
                    out += [os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/") for f in files]
            return sorted(out)
        def get_full_path(name, filename):
            if name not in folder_names_and_paths:
                return None
            for root in folder_names_and_paths[name][0]:
                path = os.path.join(root, filename)
                if os.path.isfile(path):
                    return path
            return None
        def get_output_directory():
            return os.path.join(base_path, "output")
        def get_input_directory():
            return os.path.join(base_path, "input")
    """,
    "comfy/model_management.py": """
        import torch
        class InterruptProcessingException(Exception):
            pass
        interrupt_processing = False
        def get_torch_device():
            return torch.device("cpu")
        def throw_exception_if_processing_interrupted():
            global interrupt_processing
            if interrupt_processing:
                interrupt_processing = False
                raise InterruptProcessingException()
    """,
    "comfy/utils.py": """
        class ProgressBar:
            updates = []
            def __init__(self, total, node_id=None):
                self.total = total
            def update_absolute(self, value, total=None, preview=None):
                ProgressBar.updates.append((value, total or self.total))
    """,
    "comfy/sd1_clip.py": """
        import os
        from transformers import CLIPTokenizer
        class SDTokenizer:
            def __init__(self, tokenizer_path=None, max_length=77):
                if tokenizer_path is None:
                    tokenizer_path = os.path.join(os.path.dirname(os.path.realpath(__file__)), "sd1_tokenizer")
                self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_path)
    """,
}

# Runs in a fresh process, like ComfyUI's main: its modules first, then the pack from its folder.
PROBE = """
import importlib.util, json, os, sys
sys.argv = ["main.py", "--cpu"]
sys.path.insert(0, {comfy!r})
if os.path.exists(os.path.join({comfy!r}, "comfy", "options.py")):
    import comfy.options
    comfy.options.enable_args_parsing()  # as ComfyUI's main does, so --cpu is read
import folder_paths, comfy.model_management
import comfy
name = {pack!r}.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join({pack!r}, "__init__.py"),
                                              submodule_search_locations=[{pack!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules[name] = pack
spec.loader.exec_module(pack)
bridge = sys.modules[name + ".nodes.comfy_bridge"]
model, = pack.NODE_CLASS_MAPPINGS["VE_LoadModel"]().load("builtin:tiny", "fp32", "auto", keep_loaded=True)
tokenizer_dirs = bridge.comfy_tokenizer_dirs()
report = {{
    "comfy_file": getattr(comfy, "__file__", None),
    "in_comfyui": bridge.in_comfyui(),
    "device": str(model.device),
    "output": bridge.output_directory() == folder_paths.get_output_directory(),
    "checkpoints": bridge.model_files("checkpoints"),
    "checkpoint_path": bridge.model_path("checkpoints", "sub/model.safetensors"),
    "missing_path": bridge.model_path("checkpoints", "nope.safetensors"),
    "tokenizer_dirs": tokenizer_dirs,
    "tokenizer_ids": __import__("transformers").CLIPTokenizer.from_pretrained(tokenizer_dirs[0])("a cat").input_ids,
    "choices": pack.NODE_CLASS_MAPPINGS["VE_LoadModel"].INPUT_TYPES()["required"]["checkpoint"][0],
}}
try:
    bridge.model_files("no_such_kind")
    report["unknown_kind"] = "silent"
except Exception as exc:
    report["unknown_kind"] = type(exc).__name__
if {real!r}:  # ComfyUI's model manager takes our model, frees it, and it still works after
    import comfy.model_management as mm
    managed, = pack.NODE_CLASS_MAPPINGS["VE_LoadModel"]().load("builtin:tiny", "fp32", "auto")
    patcher = managed.unet._video_edit_patcher
    bridge.load_for_use(managed)
    report["managed"] = any(m.model is patcher for m in mm.current_loaded_models)
    mm.unload_all_models()
    report["released"] = not any(m.model is patcher for m in mm.current_loaded_models)
    models = sys.modules[name + ".pipelines_core.models.model"]
    report["usable"] = models.encode_prompt(managed, "a cat").shape[0] == 1
print("REPORT " + json.dumps(report))
"""


def make_comfy_tree(root: Path) -> Path:
    from comfyui_video_edit.pipelines_core.models.tiny import write_tiny_tokenizer

    for rel, code in COMFY_TREE.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
    assert not (root / "comfy" / "__init__.py").exists()  # a namespace package, as in ComfyUI
    write_tiny_tokenizer(str(root / "comfy" / "sd1_tokenizer"))  # vocab.json + merges.txt, as ComfyUI ships
    (root / "models" / "checkpoints" / "sub").mkdir(parents=True)
    (root / "models" / "checkpoints" / "sub" / "model.safetensors").write_bytes(b"")
    return root


def probe(comfy_root: Path, real: bool = False) -> dict:
    code = PROBE.format(comfy=str(comfy_root), pack=str(PACK), real=real)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=comfy_root, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("REPORT "):])


def test_the_pack_runs_beside_a_namespace_comfy_package(tmp_path):
    report = probe(make_comfy_tree(tmp_path))
    assert report["comfy_file"] is None  # what broke every graph in the real ComfyUI
    assert report["in_comfyui"] and report["device"] == "cpu" and report["output"]
    assert report["checkpoints"] == ["sub/model.safetensors"]
    assert "sub/model.safetensors" in report["choices"]
    assert report["checkpoint_path"].endswith("model.safetensors") and report["missing_path"] is None
    assert Path(report["tokenizer_dirs"][0]).resolve() == (tmp_path / "comfy" / "sd1_tokenizer").resolve()
    assert report["tokenizer_ids"][0] != report["tokenizer_ids"][-1]
    assert report["unknown_kind"] == "KeyError"  # a failed lookup raises; it is not "no files"


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout")
def test_the_pack_runs_beside_a_real_comfyui():
    report = probe(Path(os.environ["COMFYUI_PATH"]), real=True)
    assert report["comfy_file"] is None and report["in_comfyui"]
    assert report["managed"] and report["released"] and report["usable"]
    assert Path(report["tokenizer_dirs"][0]).name == "sd1_tokenizer"
    assert report["unknown_kind"] == "KeyError"


def test_headless_never_imports_comfyui_from_the_working_directory(tmp_path):
    """Run from inside a ComfyUI checkout, the headless command must stay headless."""
    make_comfy_tree(tmp_path)
    code = ("import sys; from comfyui_video_edit.nodes import comfy_bridge; "
            "print(comfy_bridge.in_comfyui(), 'comfy.model_management' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]
