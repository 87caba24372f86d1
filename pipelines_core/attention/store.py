"""Recorded attention and features: a byte-budgeted store keyed by (layer, timestep, kind), the
recorders that fill it during inversion, and the estimate of what a recording will need.

Kinds and the shape of one entry (all frames of the video, fp16, CPU or a file on disk):
  "self_probs"  (F, heads, N, k*N)   self-attention probabilities; k = key frames of the rule in use
  "cross_probs" (F, heads, N, L)     cross-attention probabilities over the L text tokens
  "q", "k"      (F, heads, N | k*N, head_dim)   self-attention query and (gathered) key
  "feature"     (F, C, h, w)         the output of a named module (e.g. "up_blocks.1.resnets.1")
Attention layers are named by their processor key, features by their module path, so an injector
reads what a recorder wrote by the same names. Only the conditional CFG half is recorded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..models.backbone import blank_unet_kwargs
from .attach import is_self_attention
from .processor import AttnCall, AttnEdit, FrameLayout
from .rules import get_rule

KINDS = ("self_probs", "cross_probs", "q", "k", "feature")
STORAGES = ("cpu", "disk")
STORED_DTYPE = torch.float16
Key = tuple  # (layer name, timestep, kind)


class StoreBudgetError(MemoryError):
    """A recording that does not fit its byte budget."""


def gib(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (4 * 2**30 -> '4.0 GiB')."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


RAM_FIX = "lower max_tokens, record fewer kinds, or use disk storage / raise the budget"
DISK_FIX = "lower max_tokens, record fewer kinds, or free disk space"


def over_budget_message(needed: int, budget: int, where: str = "the budget", fix: str = RAM_FIX) -> str:
    return f"DDIM Invert: recording needs {gib(needed)} but {where} is {gib(budget)}; {fix}"


# --- what to record --------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordSpec:
    """What DDIM Invert records at every step besides the latents (nothing by default).

    max_tokens: attention layers with more query tokens are never recorded (FateZero: 32*32).
    storage: "cpu" keeps fp16 tensors in RAM under the byte budget; "disk" writes one file per entry
    into a fresh subfolder of `folder` (the system temp folder when empty), bounded by free space.
    """

    self_probs: bool = False
    cross_probs: bool = False
    qk: bool = False
    features: tuple = ()
    max_tokens: int = 1024
    storage: str = "cpu"
    folder: str = ""

    @property
    def records_attention(self) -> bool:
        return self.self_probs or self.cross_probs or self.qk

    @property
    def is_empty(self) -> bool:
        return not (self.records_attention or self.features)

    @property
    def records_self_keys(self) -> bool:
        return self.self_probs or self.qk

    def check(self) -> None:
        if self.storage not in STORAGES:
            raise ValueError(f"unknown storage {self.storage!r}; choose one of {', '.join(STORAGES)}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1 (got {self.max_tokens})")
        if isinstance(self.features, str):
            raise ValueError("features must be a tuple of module names, e.g. ('up_blocks.1.resnets.1',)")
        if self.storage == "disk" and self.folder and not os.path.isdir(self.folder):
            raise ValueError(f"storage folder {self.folder!r} does not exist; create it, or leave it empty "
                             "for the temp folder")

    def disk_folder(self) -> str:
        return self.folder or tempfile.gettempdir()


# --- the store -------------------------------------------------------------------------------

class AttentionStore:
    """fp16 tensors keyed by (layer, timestep, kind), in RAM or one safetensors file per entry.

    `budget_bytes` bounds `nbytes` (the tensor bytes held); a put that would pass it raises
    StoreBudgetError and leaves the store unchanged. A disk store's folder is removed with the store.
    """

    def __init__(self, budget_bytes: int, folder: Optional[str] = None):
        self.budget_bytes = int(budget_bytes)
        self.nbytes = 0
        self._entries: dict[Key, object] = {}  # tensor, or file path on disk
        self._sizes: dict[Key, int] = {}
        self.folder = None
        if folder is not None:
            self.folder = tempfile.mkdtemp(prefix="attention_store_", dir=folder)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)

    @property
    def storage(self) -> str:
        return "cpu" if self.folder is None else "disk"

    def put(self, layer: str, timestep: int, kind: str, value: torch.Tensor) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown store kind {kind!r}; choose one of {', '.join(KINDS)}")
        key = (layer, int(timestep), kind)
        value = value.detach().to("cpu", STORED_DTYPE).contiguous()
        size = value.numel() * value.element_size()
        total = self.nbytes - self._sizes.get(key, 0) + size
        if total > self.budget_bytes:
            if self.folder is None:
                raise StoreBudgetError(over_budget_message(total, self.budget_bytes))
            raise StoreBudgetError(over_budget_message(total, self.budget_bytes, "the disk budget", DISK_FIX))
        self._entries[key] = self._write(key, value) if self.folder else value
        self._sizes[key] = size
        self.nbytes = total

    def get(self, layer: str, timestep: int, kind: str) -> torch.Tensor:
        key = (layer, int(timestep), kind)
        if key not in self._entries:
            raise KeyError(f"nothing recorded for layer {layer!r} at timestep {int(timestep)} ({kind}); "
                           "record it in DDIM Invert with the same steps and layers")
        entry = self._entries[key]
        if isinstance(entry, str):
            from safetensors.torch import load_file

            return load_file(entry)["value"]
        return entry

    def reset(self) -> None:
        for entry in self._entries.values():
            if isinstance(entry, str) and os.path.exists(entry):
                os.remove(entry)
        self._entries.clear()
        self._sizes.clear()
        self.nbytes = 0

    def keys(self) -> list[Key]:
        return list(self._entries)

    def __contains__(self, key: Key) -> bool:
        layer, timestep, kind = key
        return (layer, int(timestep), kind) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"AttentionStore({len(self)} entries, {gib(self.nbytes)} of {gib(self.budget_bytes)}, {self.storage})"

    def _write(self, key: Key, value: torch.Tensor) -> str:
        from safetensors.torch import save_file

        path = self._entries.get(key)
        if not isinstance(path, str):
            path = os.path.join(self.folder, f"{len(self._sizes):07d}.safetensors")
        save_file({"value": value}, path)
        return path


# --- recorders -------------------------------------------------------------------------------

def cond_rows(layout: Optional[FrameLayout], batch: int) -> slice:
    """Rows of the conditional CFG half in a (chunk, frame) batch: FateZero edits only that half."""
    if layout is None or "cond" not in layout.roles:
        raise ValueError("recording needs the sampler's frame layout (roles with a 'cond' chunk)")
    return layout.rows("cond", batch)


class StepBuffer:
    """Per-frame pieces of one step, gathered across chunks and put into the store at the step's end.

    A frame that is context in a later chunk (the anchor) is kept from its own chunk (first write).
    """

    def __init__(self, store: AttentionStore, frames: int):
        self.store = store
        self.frames = frames
        self._pending: dict[tuple, dict[int, torch.Tensor]] = {}

    def add(self, layer: str, kind: str, layout: Optional[FrameLayout], batch_values: torch.Tensor) -> None:
        rows = batch_values[cond_rows(layout, batch_values.shape[0])]
        pieces = self._pending.setdefault((layer, kind), {})
        for frame, value in zip(layout.frame_ids, rows):
            pieces.setdefault(int(frame), value.detach().to("cpu", STORED_DTYPE))

    def flush(self, timestep: int) -> None:
        for (layer, kind), pieces in self._pending.items():
            if sorted(pieces) != list(range(self.frames)):
                raise RuntimeError(f"recording of {layer} ({kind}) saw frames {sorted(pieces)}, not all {self.frames}")
            self.store.put(layer, timestep, kind, torch.stack([pieces[f] for f in range(self.frames)]))
        self._pending.clear()


class ProbsRecorder(AttnEdit):
    """Records attention probabilities: self_probs on attn1 layers, cross_probs on attn2 layers."""

    def __init__(self, buffer: StepBuffer):
        self.buffer = buffer

    def probs(self, call: AttnCall, p):
        self.buffer.add(call.name, "self_probs" if call.is_self else "cross_probs", call.layout, p)
        return p


class QKRecorder(AttnEdit):
    """Records self-attention queries and keys (after the cross-frame gather), as PnP injects them."""

    def __init__(self, buffer: StepBuffer):
        self.buffer = buffer

    def qkv(self, call: AttnCall, q, k, v):
        self.buffer.add(call.name, "q", call.layout, q)
        self.buffer.add(call.name, "k", call.layout, k)
        return q, k, v


def recording_edits(name: str, tokens: int, spec: RecordSpec, buffer: StepBuffer) -> list[AttnEdit]:
    """The recorders for attention layer `name` (query length `tokens`) under `spec`."""
    if tokens > spec.max_tokens:
        return []
    is_self = is_self_attention(name)
    edits: list[AttnEdit] = []
    if (spec.self_probs and is_self) or (spec.cross_probs and not is_self):
        edits.append(ProbsRecorder(buffer))
    if spec.qk and is_self:
        edits.append(QKRecorder(buffer))
    return edits


def module_output(output) -> torch.Tensor:
    """The tensor a module returns (diffusers blocks return tuples or output dataclasses)."""
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def check_feature_names(unet, names) -> None:
    for name in names:
        try:
            unet.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the UNet has no module {name!r} to record; "
                             "use a path like 'up_blocks.1.resnets.1'") from None


@contextmanager
def feature_recording(unet, names, buffer: StepBuffer) -> Iterator[None]:
    """Forward hooks that put the outputs of the named modules into `buffer`, removed on exit.

    The frame layout of the current UNet call is read from its `cross_attention_kwargs` by a
    pre-hook on the UNet, so a module's hook knows which rows are which frames.
    """
    check_feature_names(unet, names)
    current: dict = {}

    def remember_layout(module, args, kwargs):
        current["layout"] = (kwargs.get("cross_attention_kwargs") or {}).get("layout")

    handles = [unet.register_forward_pre_hook(remember_layout, with_kwargs=True)] if names else []
    for name in names:
        def record(module, args, output, name=name):
            buffer.add(name, "feature", current.get("layout"), module_output(output))

        handles.append(unet.get_submodule(name).register_forward_hook(record))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- how much a recording needs ----------------------------------------------------------------

@dataclass(frozen=True)
class AttnLayer:
    name: str  # processor key
    is_self: bool
    heads: int
    head_dim: int
    tokens: int  # query tokens at this layer's resolution


def _level(name: str, unet) -> int:
    """Resolution level (0 = full latent size) of an attention layer, from its block path."""
    block, _, rest = name.partition(".")
    if block == "down_blocks":
        return int(rest.split(".")[0])
    if block == "mid_block":
        return len(unet.down_blocks) - 1
    if block == "up_blocks":
        return len(unet.up_blocks) - 1 - int(rest.split(".")[0])
    raise ValueError(f"cannot place attention layer {name!r} in the UNet's resolution levels")


def _halve(size: int, times: int) -> int:
    for _ in range(times):
        size = (size + 1) // 2  # stride-2 convolution with padding 1
    return size


def attention_layers(unet, height: int, width: int) -> list[AttnLayer]:
    """Every attention layer of `unet` with its heads and query tokens for frames of height x width pixels."""
    h, w = height // 8, width // 8
    layers = []
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        level = _level(name, unet)
        layers.append(AttnLayer(name, is_self_attention(name), attn.heads, attn.to_q.out_features // attn.heads,
                                _halve(h, level) * _halve(w, level)))
    return layers


def key_frames(attention: str, frames: int) -> int:
    """How many frames' keys each self-attention query reads under a cross-frame rule."""
    return int(get_rule(attention)(frames).shape[1])


def feature_shapes(unet, names, height: int, width: int) -> dict[str, tuple]:
    """Per-frame output shapes of the named modules, from one forward pass of a weightless twin."""
    if not names:
        return {}
    check_feature_names(unet, names)
    with torch.device("meta"):
        twin = type(unet).from_config(unet.config)
        x = torch.empty(1, twin.config.in_channels, height // 8, width // 8)
        text = torch.empty(1, 77, twin.config.cross_attention_dim)
        added = blank_unet_kwargs(twin.config, 1)
    shapes = {}
    handles = [twin.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: shapes.__setitem__(n, tuple(module_output(out).shape[1:]))) for n in names]
    try:
        twin(x, torch.tensor(1, device="meta"), encoder_hidden_states=text, **added)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def estimate_bytes(spec: RecordSpec, unet, frames: int, height: int, width: int, steps: int,
                   attention: str = "none", text_tokens: int = 77) -> int:
    """Bytes that recording `spec` at `steps` inversion steps of `frames` frames will put in the store.

    Per step and frame (fp16): heads*N*(k*N) per self-attention map, heads*N*L per cross-attention
    map, heads*N*d + heads*(k*N)*d for q and k, C*h*w per feature; layers with N > max_tokens skipped.
    """
    k = key_frames(attention, frames)
    per_frame = 0
    for layer in attention_layers(unet, height, width):
        if layer.tokens > spec.max_tokens:
            continue
        n = layer.tokens
        keys = k * n if layer.is_self else text_tokens
        if (layer.is_self and spec.self_probs) or (not layer.is_self and spec.cross_probs):
            per_frame += layer.heads * n * keys
        if layer.is_self and spec.qk:
            per_frame += layer.heads * (n + keys) * layer.head_dim
    per_frame += sum(_numel(s) for s in feature_shapes(unet, spec.features, height, width).values())
    return per_frame * frames * steps * torch.finfo(STORED_DTYPE).bits // 8
