"""Single-file SD-1.5 checkpoints: exact offline round trip, tokenizer lookup, shipped configs."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from comfyui_video_edit.pipelines_core.models import single_file as ckpt
from comfyui_video_edit.pipelines_core.models.controlnet import CONTROLNET_SD15_CONFIG_DIR
from comfyui_video_edit.pipelines_core.models.tiny import build_tiny_components, write_tiny_tokenizer

from ldm_layout import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, to_ldm_checkpoint, unet_to_ldm

SD15 = ckpt.SD15_CONFIG_DIR


# --- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny components, their configs as a diffusers config folder, and their original-layout state dict."""
    root = tmp_path_factory.mktemp("tiny")
    components = build_tiny_components(str(root / "tokenizer_src"))
    config_dir = root / "configs"
    components["unet"].save_config(str(config_dir / "unet"))
    components["vae"].save_config(str(config_dir / "vae"))
    components["text_encoder"].config.save_pretrained(str(config_dir / "text_encoder"))
    (config_dir / "scheduler").mkdir()
    (config_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(components["scheduler_config"]))
    state = to_ldm_checkpoint(components["unet"], components["vae"], components["text_encoder"])
    return components, str(config_dir), state


class _PickledObject:
    """Anything that is not a tensor: weights_only loading must refuse to build it."""


def _write(folder, state: dict, fmt: str) -> str:
    """Save `state` as a single file in one of the layouts found in the wild."""
    os.makedirs(folder, exist_ok=True)
    if fmt == "safetensors":
        path = os.path.join(folder, "model.safetensors")
        save_file(state, path)
        return path
    path = os.path.join(folder, "model.ckpt")
    if fmt == "ckpt_legacy_clip":  # early SD-1.x files: CLIP keys without the `text_model.` level
        state = {k.replace(CLIP_PREFIX + "text_model.", CLIP_PREFIX): v for k, v in state.items()}
    payload = {"state_dict": state, "global_step": 1}  # Lightning training checkpoint
    if fmt == "ckpt_with_object":
        payload["callbacks"] = _PickledObject()
    torch.save(payload, path)
    return path




def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def _unet_inputs(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 500]), text


# --- round trip --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "ckpt_legacy_clip"])
def test_single_file_loads_exact_weights_offline(tiny, tmp_path, no_network, fmt):
    components, config_dir, state = tiny
    path = _write(tmp_path, state, fmt)
    write_tiny_tokenizer(str(tmp_path / "tokenizer"))  # SD-1.5's tokenizer folder next to the checkpoint

    loaded = ckpt.load_single_file(path, config_dir=config_dir)

    assert set(loaded) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler_config"}
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(components[name], loaded[name])
        assert not loaded[name].training
        assert not any(p.requires_grad for p in loaded[name].parameters())
    with torch.no_grad():
        x, t, text = _unet_inputs(components["unet"])
        assert torch.equal(components["unet"](x, t, text).sample, loaded["unet"](x, t, text).sample)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        assert torch.equal(components["vae"].decode(z).sample, loaded["vae"].decode(z).sample)
        def token_ids(tokenizer):
            return tokenizer("a red car", padding="max_length", return_tensors="pt").input_ids

        ids = token_ids(loaded["tokenizer"])
        assert ids.shape[1] == 77 and torch.equal(ids, token_ids(components["tokenizer"]))
        assert torch.equal(components["text_encoder"](ids)[0], loaded["text_encoder"](ids)[0])
    assert loaded["scheduler_config"] == components["scheduler_config"]
    assert "HF_HUB_OFFLINE" not in os.environ  # offline mode is scoped to the call


def test_torch_dtype_is_applied(tiny, tmp_path, no_network):
    components, config_dir, state = tiny
    path = _write(tmp_path, state, "safetensors")
    write_tiny_tokenizer(str(tmp_path / "tokenizer"))
    loaded = ckpt.load_single_file(path, config_dir=config_dir, torch_dtype=torch.bfloat16)
    for name in ("unet", "vae", "text_encoder"):
        expected = components[name].state_dict()
        got = loaded[name].state_dict()
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            want = value.to(torch.bfloat16) if value.is_floating_point() else value
            assert got[key].dtype == want.dtype and torch.equal(got[key], want), key


def test_pickled_objects_are_refused(tiny, tmp_path):
    components, config_dir, state = tiny
    path = _write(tmp_path, state, "ckpt_with_object")
    write_tiny_tokenizer(str(tmp_path / "tokenizer"))
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_single_file(path, config_dir=config_dir)


@pytest.mark.parametrize(
    "dropped, message",
    [
        (UNET_PREFIX + "out.2.bias", "lacks UNet weights"),
        (CLIP_PREFIX + "text_model.final_layer_norm.bias", "lacks text encoder weights (1, e.g. "),
    ],
)
def test_missing_weights_are_reported(tiny, tmp_path, dropped, message):
    _, config_dir, state = tiny
    partial = {k: v for k, v in state.items() if k != dropped}
    path = _write(tmp_path, partial, "safetensors")
    write_tiny_tokenizer(str(tmp_path / "tokenizer"))
    with pytest.raises(ValueError, match=re.escape(message)):
        ckpt.load_single_file(path, config_dir=config_dir)


def test_non_sd15_files_get_one_line_errors(tiny, tmp_path):
    components, config_dir, state = tiny
    write_tiny_tokenizer(str(tmp_path / "tokenizer"))
    # The tiny UNet cross-attends to 32-wide text features, not SD-1.5's 768 (as SD-2.x's 1024 would not).
    with pytest.raises(ValueError, match="only SD-1.5 checkpoints") as err:
        ckpt.load_single_file(_write(tmp_path, state, "safetensors"), config_dir=SD15)
    assert "\n" not in str(err.value)
    inpainting = dict(state)
    conv_in = state[UNET_PREFIX + "input_blocks.0.0.weight"]
    inpainting[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.cat([conv_in, conv_in, conv_in[:, :1]], dim=1)
    with pytest.raises(ValueError, match="takes 9 latent channels"):
        path = _write(tmp_path / "i", inpainting, "safetensors")
        ckpt.load_single_file(path, tokenizer_dir=str(tmp_path), config_dir=config_dir)
    diffusers_layout = {k: v.contiguous() for k, v in components["unet"].state_dict().items()}
    with pytest.raises(ValueError, match="model.diffusion_model"):
        ckpt.load_single_file(_write(tmp_path / "d", diffusers_layout, "safetensors"), tokenizer_dir=str(tmp_path))


def test_incomplete_config_dir_fails_locally(tiny, tmp_path, no_network):
    _, config_dir, state = tiny
    partial = tmp_path / "configs"
    shutil.copytree(config_dir, partial)
    shutil.rmtree(partial / "text_encoder")
    write_tiny_tokenizer(str(tmp_path / "tokenizer"))
    with pytest.raises(FileNotFoundError, match="lacks text_encoder/config.json"):
        ckpt.load_single_file(_write(tmp_path, state, "safetensors"), config_dir=str(partial))


# --- tokenizer lookup --------------------------------------------------------------------------------

def test_missing_tokenizer_gives_clear_error(tiny, tmp_path, no_network):
    _, config_dir, state = tiny
    path = _write(tmp_path, state, "safetensors")
    with pytest.raises(FileNotFoundError) as err:
        ckpt.load_single_file(path, config_dir=config_dir)
    message = str(err.value)
    assert "No CLIP tokenizer" in message and "next to the checkpoint" in message and "'tokenizer' input" in message
    assert "\n" not in message


def test_tokenizer_lookup_order(tmp_path):
    model = tmp_path / "models" / "sd15.safetensors"
    model.parent.mkdir()
    model.write_bytes(b"")
    comfy = write_tiny_tokenizer(str(tmp_path / "comfy" / "sd1_tokenizer"))
    explicit = write_tiny_tokenizer(str(tmp_path / "mine"))

    assert ckpt.find_tokenizer_dir(str(model), extra_candidates=[comfy]) == comfy
    beside = write_tiny_tokenizer(str(model.parent))  # vocab.json + merges.txt right next to the file
    assert ckpt.find_tokenizer_dir(str(model), extra_candidates=[comfy]) == beside
    sub = write_tiny_tokenizer(str(model.parent / "tokenizer"))
    assert ckpt.find_tokenizer_dir(str(model), extra_candidates=[comfy]) == sub
    assert ckpt.find_tokenizer_dir(str(model), explicit, extra_candidates=[comfy]) == explicit
    # A diffusers pipeline folder works as an explicit tokenizer folder too.
    assert ckpt.find_tokenizer_dir(str(model), str(model.parent)) == sub
    with pytest.raises(FileNotFoundError, match="has no vocab.json"):
        ckpt.find_tokenizer_dir(str(model), str(tmp_path / "comfy"))


def test_hub_offline_blocks_hub_requests_and_restores(tmp_path, no_network):
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    before = hub_constants.HF_HUB_OFFLINE
    with ckpt.hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.is_offline_mode()
        with pytest.raises(Exception) as err:  # refused locally, before any socket is opened
            huggingface_hub.hf_hub_download("some-org/some-model", "config.json", cache_dir=str(tmp_path))
        assert "network access attempted" not in str(err.value)
    assert hub_constants.HF_HUB_OFFLINE == before and "HF_HUB_OFFLINE" not in os.environ


# --- shipped SD-1.5 configs --------------------------------------------------------------------------

def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sd15_attention_processors() -> set[str]:
    """SD-1.5's 16 transformer blocks x (self, cross) attention."""
    blocks = [f"down_blocks.{b}.attentions.{i}" for b in range(3) for i in range(2)]
    blocks += ["mid_block.attentions.0"]
    blocks += [f"up_blocks.{b}.attentions.{i}" for b in (1, 2, 3) for i in range(3)]
    return {f"{blk}.transformer_blocks.0.attn{a}.processor" for blk in blocks for a in (1, 2)}


def test_shipped_configs_describe_sd15_without_weights():
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15, subfolder="vae"))
        text_config = CLIPTextConfig.from_pretrained(SD15, subfolder="text_encoder", local_files_only=True)
        text_encoder = CLIPTextModel(text_config)
        controlnet_dir = CONTROLNET_SD15_CONFIG_DIR
        controlnet = ControlNetModel.from_config(ControlNetModel.load_config(controlnet_dir))
        controlnet_of_unet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)

    assert all(p.is_meta for p in unet.parameters())
    assert round(_count(unet) / 1e6, 1) == 859.5  # SD-1.5's "860M UNet"
    assert set(unet.attn_processors) == _sd15_attention_processors() and len(unet.attn_processors) == 32
    assert unet.config.sample_size * 8 == 512 and unet.config.cross_attention_dim == text_config.hidden_size == 768
    assert round(_count(vae) / 1e6, 1) == 83.7 and vae.config.scaling_factor == 0.18215
    assert round(_count(text_encoder) / 1e6, 1) == 123.1  # CLIP ViT-L/14 text tower
    assert (text_config.num_hidden_layers, text_config.num_attention_heads, text_config.vocab_size) == (12, 12, 49408)
    assert text_config.max_position_embeddings == 77 and text_config.hidden_act == "quick_gelu"
    # The shipped ControlNet config is exactly the trainable copy of this UNet's encoder.
    assert {n: p.shape for n, p in controlnet.named_parameters()} == {
        n: p.shape for n, p in controlnet_of_unet.named_parameters()
    }

    with open(os.path.join(SD15, "scheduler", "scheduler_config.json")) as f:
        scheduler = DDIMScheduler.from_config(json.load(f))
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.steps_offset == 1 and not scheduler.config.clip_sample
    assert not scheduler.config.set_alpha_to_one


def test_original_layout_of_sd15_is_what_diffusers_expects():
    """The test helper's key layout, checked on SD-1.5's own shapes against diffusers' converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, infer_diffusers_model_type

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15, subfolder="unet"))
    original = unet_to_ldm(unet.state_dict())
    assert infer_diffusers_model_type(original) == "v1"
    # Upsamplers sit after the attention in attention levels, right after the resnet otherwise.
    assert UNET_PREFIX + "output_blocks.2.1.conv.weight" in original  # up level 0 has no attention
    assert UNET_PREFIX + "output_blocks.5.2.conv.weight" in original
    assert UNET_PREFIX + "input_blocks.9.0.op.weight" in original and len(original) == 686
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet.state_dict().items()}


def test_tiny_original_layout_uses_ldm_names(tiny):
    _, _, state = tiny
    model_keys = [k for k in state if k not in ("betas", "alphas_cumprod")]
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)) for k in model_keys)
    assert state[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
    assert VAE_PREFIX + "decoder.up.3.upsample.conv.weight" in state  # decoder levels are listed bottom-up
    assert VAE_PREFIX + "decoder.up.0.upsample.conv.weight" not in state
