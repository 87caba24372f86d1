"""Gradients inside a run that otherwise has none: null-text inversion, Tune-A-Video's tuning, FRESCO's feature
optimisation all optimise something while the sampler runs under no_grad and ComfyUI under inference_mode."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def local_gradients() -> Iterator[None]:
    """Autograd on, inference mode off (tensors made here can be saved for backward), and deterministic kernels,
    restored on exit.

    Deterministic kernels because an optimisation amplifies rounding: with several CPU threads some backward
    kernels split their reductions differently from run to run, and Tune-A-Video's edit moved by up to 3.7e-4 (in
    latents, 2 threads, 4 tuning steps) between two runs of the same graph; with deterministic kernels two runs are
    bit-identical, so a seed gives the same LoRA in ComfyUI and headless. `warn_only`: an op with no deterministic
    kernel on the device warns instead of failing the run.
    """
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
