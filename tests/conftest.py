import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="session")
def tiny_model():
    """The builtin:tiny model on the CPU in fp32 (random weights, fixed seed)."""
    from comfyui_video_edit.pipelines_core.models.model import load_model

    return load_model("builtin:tiny", dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def sd15_unet():
    """SD-1.5's UNet from the shipped config, weightless (meta device): for tests of which layers a method picks."""
    from diffusers import UNet2DConditionModel

    from comfyui_video_edit.pipelines_core.models.single_file import SD15_CONFIG_DIR

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR, subfolder="unet"))


@pytest.fixture
def clip_frames():
    """Three distinct 64x64 frames (ComfyUI IMAGE)."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 64, 64, 3, generator=g)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tiny models' tensors are small: one thread is as fast, and does not stall when jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_inversion_cache():
    from comfyui_video_edit.pipelines_core.sampling.inversion import clear_inversion_cache

    clear_inversion_cache()
    yield
    clear_inversion_cache()


@pytest.fixture
def no_network(monkeypatch):
    """Any socket use fails the test: loading must be purely local."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


class Cancelled(Exception):
    """What a user's Cancel looks like to the engine: the progress callback raises."""


@pytest.fixture
def cancel_at():
    """A progress callback that raises Cancelled when `step` steps are done."""

    def make(step):
        def progress(done, total):
            if done == step:
                raise Cancelled()

        return progress

    make.error = Cancelled
    return make


@pytest.fixture(autouse=True)
def outputs_in_tmp_path(tmp_path):
    """Every test's output nodes write into its own tmp_path (as `video-edit run --output-dir` does for a run)."""
    from comfyui_video_edit.nodes import comfy_bridge

    with comfy_bridge.writing_to(str(tmp_path)):
        yield
