"""Everything the nodes need from ComfyUI, with a headless fallback when ComfyUI is absent.

Inside ComfyUI: its progress bar (which also raises on Cancel), its device choice, its folders.
Headless (the `video-edit` command, tests, scripts): tqdm, the 'auto' device, ./output and paths.
"""

from __future__ import annotations

import os
from typing import Optional

_OUTPUT_DIR: Optional[str] = None
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def find_file(name: str, comfy_kind: Optional[str] = None) -> Optional[str]:
    """A file by name: in a ComfyUI model folder kind, as a path, or bundled with the pack (assets/)."""
    if comfy_kind:
        found = model_path(comfy_kind, name)
        if found:
            return found
    for path in (os.path.expanduser(name), os.path.join(ASSETS, name)):
        if os.path.isfile(path):
            return path
    return None


def _comfy():
    """ComfyUI's modules when this pack runs inside ComfyUI, else None."""
    try:
        import comfy.model_management
        import comfy.utils
        import folder_paths
    except ImportError:
        return None
    return comfy, folder_paths


def file_fingerprint(path: Optional[str]) -> str:
    """Changes when the file (or folder) at `path` changes, so ComfyUI's cache does not serve a stale result."""
    if not path or not os.path.exists(path):
        return ""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def in_comfyui() -> bool:
    return _comfy() is not None


def progress(desc: str):
    """A `progress(done, total)` callable: ComfyUI's bar inside ComfyUI (raises on Cancel), tqdm headless."""
    env = _comfy()
    if env is None:
        from ..pipelines_core.progress import tqdm_progress

        return tqdm_progress(desc)
    comfy, _ = env
    bars: dict = {}

    def update(done: int, total: int) -> None:
        bar = bars.get(total)
        if bar is None:
            bar = bars[total] = comfy.utils.ProgressBar(total)
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update


def device_choice(device: str) -> str:
    """'auto' inside ComfyUI means ComfyUI's own device (which honours --cpu)."""
    env = _comfy()
    if device != "auto" or env is None:
        return device
    comfy, _ = env
    return str(comfy.model_management.get_torch_device().type)


# --- folders ------------------------------------------------------------------------------------

def set_output_directory(path: str) -> None:
    """Headless runs choose where output nodes write (the runner's --output-dir)."""
    global _OUTPUT_DIR
    _OUTPUT_DIR = os.path.abspath(path)


def output_directory() -> str:
    env = _comfy()
    if env is not None:
        return env[1].get_output_directory()
    return _OUTPUT_DIR or os.path.abspath("output")


def input_directory() -> Optional[str]:
    env = _comfy()
    return env[1].get_input_directory() if env is not None else None


def model_files(kind: str) -> list[str]:
    """File names ComfyUI lists for a model folder kind ("checkpoints", "loras", "controlnet"); [] headless."""
    env = _comfy()
    if env is None:
        return []
    try:
        return list(env[1].get_filename_list(kind))
    except Exception:  # a kind this ComfyUI does not know
        return []


def model_path(kind: str, name: str) -> Optional[str]:
    env = _comfy()
    if env is None:
        return None
    try:
        return env[1].get_full_path(kind, name)
    except Exception:
        return None


def diffusers_folders() -> dict[str, str]:
    """Folders under ComfyUI's models/diffusers that hold a model_index.json, by display name."""
    env = _comfy()
    if env is None:
        return {}
    found = {}
    try:
        roots = env[1].get_folder_paths("diffusers")
    except Exception:
        return {}
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                found[os.path.relpath(dirpath, root).replace(os.sep, "/")] = dirpath
    return found


def comfy_tokenizer_dirs() -> list[str]:
    """ComfyUI ships SD-1.5's CLIP tokenizer in comfy/sd1_tokenizer: single-file checkpoints can use it."""
    env = _comfy()
    if env is None:
        return []
    comfy, _ = env
    return [os.path.join(os.path.dirname(comfy.__file__), "sd1_tokenizer")]
