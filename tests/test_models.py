"""Load Model: builtin:tiny, diffusers folders, devices and dtypes, prompt encoding (methods.md §6 G5)."""


import pytest
import torch

from comfyui_video_edit.pipelines_core.models.model import encode_prompt, load_model, resolve_device
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
from comfyui_video_edit.pipelines_core.models.tiny import save_tiny_pipeline




def test_builtin_tiny_is_deterministic(tiny_model):
    again = load_model("builtin:tiny", device="cpu")
    for a, b in zip(tiny_model.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_diffusers_folder_loads_offline_with_identical_outputs(tiny_model, tmp_path, no_network):
    folder = save_tiny_pipeline(str(tmp_path / "tiny-sd"))
    loaded = load_model(folder, device="cpu")
    frames = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    s = SamplerSettings("a boat", seed=1, steps=3)
    assert torch.equal(edit_video(tiny_model, s, frames), edit_video(loaded, s, frames))
    assert torch.equal(encode_prompt(tiny_model, "a boat"), encode_prompt(loaded, "a boat"))


def test_prompt_embeddings_depend_on_the_prompt(tiny_model):
    a, b = encode_prompt(tiny_model, "a cat"), encode_prompt(tiny_model, "a dog")
    assert a.shape == (1, 77, tiny_model.text_encoder.config.hidden_size)
    assert (a - b).abs().max() > 1e-3


def test_bf16_loads_and_samples(tmp_path):
    model = load_model("builtin:tiny", dtype="bf16", device="cpu")
    assert model.unet.dtype == torch.bfloat16
    out = edit_video(model, SamplerSettings("x", steps=2), torch.rand(1, 32, 32, 3))
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("source, message", [
    ("/nonexistent/model.safetensors", "not found"),
    ("/tmp", "model_index.json"),
])
def test_missing_models_fail_clearly(source, message):
    with pytest.raises(FileNotFoundError, match=message):
        load_model(source, device="cpu")


def test_device_and_dtype_choices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="choose one of"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="dtype"):
        load_model("builtin:tiny", dtype="fp8", device="cpu")
    with pytest.raises(ValueError, match="fp16 on the CPU"):
        load_model("builtin:tiny", dtype="fp16", device="cpu")


def test_model_repr_is_short(tiny_model):
    assert len(repr(tiny_model)) < 80 and "builtin:tiny" in repr(tiny_model)
