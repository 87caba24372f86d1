"""Memory accounting of UNet calls, without memory: a fake copy of the UNet runs one call on fake tensors
(torch's FakeTensorMode: shapes and dtypes only, no storage, no arithmetic) while torch's MemTracker counts
the bytes its activations would hold at their peak.

The sampler uses it to batch chunks into one UNet call when the figure times the batch fits a share of the
free memory (`chunk_batch`); the benchmark uses it to say what a clip needs on a GPU it does not have.
The count covers the UNet with the run's attention processors; a ControlNet's own activations and a LoRA's
low-rank branches are not in it, which is one reason the sampler spends only a share of what is free.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Optional

import torch

from ..attention import attention_processors
from ..models.backbone import blank_unet_kwargs
from ..attention.processor import AttnEdit, FrameLayout, VideoAttnProcessor
from ..attention.rules import placed_index

# Share of the free memory the sampler lets batched chunks take: the rest is for what the count leaves out
# (ControlNet activations, the allocator's fragmentation, the VAE that decodes afterwards).
BATCH_BUDGET_SHARE = 0.5
# Frames one batched call may hold. Batching pays where a chunk alone leaves the device idle (small chunks, small
# frames); 16 frames with CFG are 32 rows, which keep a GPU's matmul units busy at 512 px, and more rows would only
# add memory. A constant, so a long clip's calls are the size of a short clip's: memory does not grow with the clip.
BATCH_FRAMES = 16


@contextmanager
def fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Index tables placed while faking are fake: keep none of them in the real runs' cache.
    placed_index.cache_clear()
    try:
        # allow_non_fake_inputs: diffusers makes small host tensors (the timestep) inside forward.
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        placed_index.cache_clear()


def _default_dtype(dtype: torch.dtype):
    @contextmanager
    def scope():
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(before)
    return scope()


def fake_model(cls, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """`cls.from_config(config)` with fake `dtype` parameters (call inside the fake mode)."""
    with _default_dtype(dtype):
        return cls.from_config(config).eval()


class ExplicitProbabilities(AttnEdit):
    """Makes a call take the explicit softmax path (as an edit that reads probabilities does), so a count
    includes the probability tensors that path holds."""

    def probs(self, call, p):
        return p


def unet_call_bytes(unet: torch.nn.Module, layout: FrameLayout, latent_size: tuple, rules: dict,
                    text_tokens: int = 77, probabilities: frozenset = frozenset()) -> int:
    """Peak bytes of the activations of one call of `unet` (its config and dtype) on a batch laid out as
    `layout` (len(roles) x frames rows) at latent size (h, w), its attention layers running the video processor
    with `rules[name]` (a Rule per processor name), the layers named in `probabilities` on the explicit softmax
    path. Parameters are not counted (they are resident anyway)."""
    return _call_bytes(type(unet), json.dumps(dict(unet.config), sort_keys=True, default=str), unet.dtype,
                       layout, tuple(latent_size), tuple(sorted(rules.items())), text_tokens,
                       frozenset(probabilities))


@lru_cache(maxsize=64)
def _call_bytes(cls, config_json: str, dtype: torch.dtype, layout: FrameLayout, latent_size: tuple,
                rules: tuple, text_tokens: int, probabilities: frozenset) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    config = json.loads(config_json)
    rule_of = dict(rules)
    explicit = (ExplicitProbabilities(),)
    rows = len(layout.roles or ("cond",)) * layout.frames
    with fake_tensors():
        unet = fake_model(cls, config, dtype)
        sample = torch.empty(rows, config["in_channels"], *latent_size, dtype=dtype)
        width = config["cross_attention_dim"]
        context = torch.empty(rows, text_tokens, width if isinstance(width, int) else width[0], dtype=dtype)
        tracker = MemTracker()
        tracker.track_external(unet)
        processors = attention_processors(unet, lambda name: VideoAttnProcessor(
            rule_of[name], name, explicit if name in probabilities else ()))
        with processors, tracker, torch.no_grad():
            unet(sample, 999, encoder_hidden_states=context, cross_attention_kwargs={"layout": layout},
                 **blank_unet_kwargs(config, rows, dtype))
        peak = tracker.get_tracker_snapshot("peak")
    return activation_peak(peak)


def activation_peak(peak: dict) -> int:
    """The activation bytes of a MemTracker "peak" snapshot, summed over devices."""
    from torch.distributed._tools.mem_tracker import _MemRefType

    return int(sum(stats.get(_MemRefType.ACT, 0) for stats in peak.values()))


def accounting_available() -> bool:
    """Whether torch's MemTracker can be imported (it is part of torch.distributed, absent from a few builds)."""
    try:
        import torch.distributed._tools.mem_tracker  # noqa: F401
    except ImportError:
        return False
    return True


def chunk_batch(per_chunk_bytes: int, chunks: int, free: Optional[int], chunk_frames: int) -> int:
    """How many chunks one UNet call may hold: as many as fit `BATCH_BUDGET_SHARE` of `free` bytes at
    `per_chunk_bytes` each (activations grow linearly with the rows of a call) and `BATCH_FRAMES` frames,
    at least 1, at most `chunks`."""
    if free is None or per_chunk_bytes <= 0:
        return 1
    fit = int(free * BATCH_BUDGET_SHARE) // per_chunk_bytes
    return max(1, min(chunks, fit, BATCH_FRAMES // chunk_frames))


def free_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new tensors on `device`: CUDA's own figure, MemAvailable on a Linux CPU; None where
    neither can be read (then nothing is refused and chunks go one per call)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None
