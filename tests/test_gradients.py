"""The optimisations inside a run (null-text inversion, Tune on Clip, FRESCO) run with autograd and deterministic
kernels, and leave the process's settings as they were."""

import pytest
import torch

from comfyui_video_edit.pipelines_core.sampling.gradients import local_gradients


def test_local_gradients_turn_on_autograd_and_deterministic_kernels_and_restore_them():
    before = torch.are_deterministic_algorithms_enabled()
    with torch.inference_mode():
        with local_gradients():
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            assert torch.are_deterministic_algorithms_enabled()
            x = torch.ones(3, requires_grad=True)
            (x * x).sum().backward()  # tensors made here can be saved for backward
            assert torch.equal(x.grad, 2 * torch.ones(3))
        assert torch.is_inference_mode_enabled() and torch.are_deterministic_algorithms_enabled() == before


def test_local_gradients_restore_the_settings_after_an_error():
    before = torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="cancelled"):
        with local_gradients():
            raise RuntimeError("cancelled")
    assert torch.are_deterministic_algorithms_enabled() == before
