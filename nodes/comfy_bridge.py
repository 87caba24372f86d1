"""Everything the nodes need from ComfyUI, with a headless fallback when ComfyUI is absent.

Inside ComfyUI: its progress bar (which also raises on Cancel), its device choice, its folders, its
tokenizer. Headless (the `video-edit` command, tests, scripts): tqdm, the 'auto' device, ./output and paths.

ComfyUI is found through its public modules (`folder_paths`, `comfy.model_management`, `comfy.utils`,
`comfy.sd1_clip`), never through a module's `__file__`: `comfy` is a namespace package (no __init__.py),
whose `__file__` is None. A lookup that fails inside ComfyUI raises; it never turns into "not found".
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

# Where output nodes write in a headless run: set for one run (`writing_to`), so a later run in the same process
# (a batch worker's next shot, a test) never inherits an earlier run's folder. Inside ComfyUI its own folder wins.
_OUTPUT_DIR: ContextVar[Optional[str]] = ContextVar("video_edit_output_dir", default=None)
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
    """ComfyUI's modules when this pack runs inside a ComfyUI process, else None.

    ComfyUI imports `folder_paths` and `comfy.model_management` before it loads custom nodes, so their
    presence in sys.modules is what "inside ComfyUI" means. We never import them first ourselves: a
    headless run started from a ComfyUI checkout would pick up its `comfy` folder, whose modules parse
    the command line on import. Once inside, an import that fails is a real error and propagates.
    """
    if "folder_paths" not in sys.modules or "comfy.model_management" not in sys.modules:
        return None
    import comfy.model_management
    import comfy.utils
    import folder_paths

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

@contextmanager
def writing_to(path: str) -> Iterator[str]:
    """Output nodes run inside the block write to `path` (the headless runner's --output-dir)."""
    token = _OUTPUT_DIR.set(os.path.abspath(path))
    try:
        yield os.path.abspath(path)
    finally:
        _OUTPUT_DIR.reset(token)


def output_directory() -> str:
    env = _comfy()
    if env is not None:
        return env[1].get_output_directory()
    return _OUTPUT_DIR.get() or os.path.abspath("output")


def lora_directory() -> str:
    """Where a LoRA the pack writes goes: ComfyUI's first models/loras folder (so LoRA Apply lists it); headless,
    the output folder."""
    env = _comfy()
    return env[1].get_folder_paths("loras")[0] if env is not None else output_directory()


def input_directory() -> Optional[str]:
    env = _comfy()
    return env[1].get_input_directory() if env is not None else None


def model_files(kind: str) -> list[str]:
    """File names ComfyUI lists for a model folder kind ("checkpoints", "loras", "controlnet"); [] headless."""
    env = _comfy()
    return list(env[1].get_filename_list(kind)) if env is not None else []


def model_path(kind: str, name: str) -> Optional[str]:
    """The full path of a file ComfyUI lists under `kind`; None when it has no such file (or headless)."""
    env = _comfy()
    return env[1].get_full_path(kind, name) if env is not None else None


def diffusers_folders() -> dict[str, str]:
    """Folders under ComfyUI's models/diffusers that hold a model_index.json, by display name."""
    env = _comfy()
    if env is None:
        return {}
    found = {}
    for root in env[1].get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            if "model_index.json" in files:
                found[os.path.relpath(dirpath, root).replace(os.sep, "/")] = dirpath
    return found


def comfy_tokenizer_dirs() -> list[str]:
    """The folder of ComfyUI's own SD-1.x CLIP tokenizer, as ComfyUI itself resolves it; [] headless.

    Single-file checkpoints carry no tokenizer; inside ComfyUI this one needs no extra file. Asked of
    `comfy.sd1_clip.SDTokenizer` (what ComfyUI uses for SD-1.5 checkpoints), so wherever ComfyUI keeps it.
    """
    if _comfy() is None:
        return []
    import comfy.sd1_clip

    return [comfy.sd1_clip.SDTokenizer().tokenizer.name_or_path]


def flux_part_dirs() -> list[str]:
    """ComfyUI's folders for a Flux transformer's other files: models/vae, then models/text_encoders (and the legacy
    models/clip it also lists); [] headless."""
    env = _comfy()
    if env is None:
        return []
    return [*env[1].get_folder_paths("vae"), *env[1].get_folder_paths("text_encoders")]


def comfy_t5_tokenizer_dirs() -> list[str]:
    """ComfyUI's T5 tokenizer folder, where its Flux tokenizer (comfy.text_encoders.flux) reads it; [] headless."""
    if _comfy() is None:
        return []
    import comfy.text_encoders.flux

    return [os.path.join(os.path.dirname(os.path.realpath(comfy.text_encoders.flux.__file__)), "t5_tokenizer")]


# --- ComfyUI's model manager --------------------------------------------------------------------

def _container(modules):
    """Our diffusers modules as one plain torch module: ComfyUI's manager writes attributes (`device`,
    `model_loaded_weight_memory`, ...) onto what it manages, and diffusers models expose `device` read-only."""
    import torch

    container = torch.nn.Module()
    container.parts = torch.nn.ModuleList(modules)
    return container


def manage_memory(modules, device) -> None:
    """Inside ComfyUI (headless: nothing): hand these modules to ComfyUI's model manager, which loads them to
    `device` when `load_for_use` asks and moves them to its offload device (the CPU) when it needs the
    memory for another model or is told to free it (`POST /free`, the Unload Models button). The patcher is
    kept on the first module, so it goes when the modules go (ComfyUI holds it only weakly)."""
    env = _comfy()
    if env is None or hasattr(modules[0], "_video_edit_patcher"):
        return
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(
        _container(modules), load_device=device, offload_device=env[0].model_management.unet_offload_device())
    object.__setattr__(modules[0], "_video_edit_patcher", patcher)  # a plain attribute, not a submodule


def is_managed(module) -> bool:
    return hasattr(module, "_video_edit_patcher")


def load_for_use(model, control=None) -> None:
    """Before a node computes with a VE_MODEL (and a VE_CONTROL's ControlNets): ComfyUI loads the managed
    ones to their device in full, evicting its own models if it must. Unmanaged ones (keep loaded,
    headless) stay where they are."""
    env = _comfy()
    if env is None:
        return
    keys = [model.unet] + [unit.controlnet for unit in (control.units if control is not None else ())]
    patchers = [m._video_edit_patcher for m in keys if is_managed(m)]
    if patchers:
        env[0].model_management.load_models_gpu(patchers, force_full_load=True)
