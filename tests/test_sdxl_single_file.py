"""Single-file SDXL base checkpoints: exact offline round trip of builtin:tiny-sdxl through SDXL's original layout,
the same sampler output, one-line refusals (refiner, quantised, incomplete, mismatched), shipped SDXL configs."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from comfyui_video_edit.pipelines_core.models import sdxl_single_file as sdxl_ckpt
from comfyui_video_edit.pipelines_core.models import single_file as ckpt
from comfyui_video_edit.pipelines_core.models.model import FOLDER_FAMILIES, _assemble, load_model
from comfyui_video_edit.pipelines_core.models.tiny import (
    build_tiny_components,
    build_tiny_sdxl_components,
    write_tiny_tokenizer,
)
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

from ldm_layout import UNET_PREFIX, VAE_PREFIX
from ldm_layout_sdxl import (
    CLIP_L_PREFIX,
    OPEN_CLIP_PREFIX,
    REFINER_OPEN_CLIP_PREFIX,
    open_clip_to_sgm,
    to_sgm_checkpoint,
)

SDXL = sdxl_ckpt.SDXL_CONFIG_DIR
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """builtin:tiny-sdxl's components, their configs laid out like configs/sdxl, and their SDXL-layout state dict."""
    root = tmp_path_factory.mktemp("tiny_sdxl")
    components = build_tiny_sdxl_components(str(root / "tokenizer_src"))
    config_dir = root / "configs"
    components["unet"].save_config(str(config_dir / "unet"))
    components["vae"].save_config(str(config_dir / "vae"))
    components["text_encoder"].config.save_pretrained(str(config_dir / "text_encoder"))
    components["text_encoder_2"].config.save_pretrained(str(config_dir / "text_encoder_2"))
    (config_dir / "scheduler").mkdir()
    (config_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(components["scheduler_config"]))
    state = to_sgm_checkpoint(*(components[name] for name in PARTS))
    return components, str(config_dir), state


def _write(folder, state: dict, name: str = "sdxl.safetensors") -> str:
    """`state` as a .safetensors file with CLIP's tokenizer files beside it (as ComfyUI users keep them)."""
    os.makedirs(folder, exist_ok=True)
    write_tiny_tokenizer(str(folder))
    path = os.path.join(folder, name)
    save_file(state, path)
    return path


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


# --- round trip --------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["load_checkpoint_file", "load_sdxl_single_file"])
def test_sdxl_single_file_loads_exact_weights_offline(tiny_sdxl, tmp_path, no_network, entry):
    components, config_dir, state = tiny_sdxl
    path = _write(tmp_path, state)
    loaded = getattr(sdxl_ckpt, entry)(path, config_dir=config_dir)  # load_checkpoint_file routes by the keys

    assert set(loaded) == {*PARTS, "tokenizer", "tokenizer_2", "scheduler_config"}
    for name in PARTS:
        _assert_same_weights(components[name], loaded[name])
        assert not loaded[name].training and not any(p.requires_grad for p in loaded[name].parameters())
    assert loaded["scheduler_config"] == components["scheduler_config"]
    # Both tokenizers read the one CLIP folder; the second pads with "!" as SDXL's tokenizer_2 does.
    ids = loaded["tokenizer"]("a red fox", padding="max_length", return_tensors="pt").input_ids
    assert ids.shape[1] == 77 and torch.equal(ids, components["tokenizer"]("a red fox", padding="max_length",
                                                                            return_tensors="pt").input_ids)
    ids_2 = loaded["tokenizer_2"]("a red fox", padding="max_length", return_tensors="pt").input_ids
    bang = loaded["tokenizer_2"].convert_tokens_to_ids("!")
    assert loaded["tokenizer_2"].pad_token == "!" and ids_2.shape[1] == 77
    assert torch.equal(ids_2[ids != ids_2], torch.full_like(ids_2[ids != ids_2], bang))  # only the padding differs
    assert (ids_2 == bang).sum() == 77 - len(loaded["tokenizer"]("a red fox").input_ids)
    assert "HF_HUB_OFFLINE" not in os.environ  # offline mode is scoped to the call


def test_torch_dtype_is_applied(tiny_sdxl, tmp_path, no_network):
    components, config_dir, state = tiny_sdxl
    loaded = sdxl_ckpt.load_sdxl_single_file(_write(tmp_path, state), config_dir=config_dir,
                                             torch_dtype=torch.bfloat16)
    for name in PARTS:
        for key, value in components[name].state_dict().items():
            want = value.to(torch.bfloat16) if value.is_floating_point() else value
            got = loaded[name].state_dict()[key]
            assert got.dtype == want.dtype and torch.equal(got, want), (name, key)


def _latents(model) -> torch.Tensor:
    s = SamplerSettings("a red fox in the snow", "blurry", seed=5, steps=2, cfg=6.0, scheduler="euler",
                        attention="none")
    return edit_video(model, s, frame_count=2, size=(64, 48))


def test_sampler_output_equals_builtin_tiny_sdxl(tiny_sdxl, tmp_path, no_network):
    components, config_dir, state = tiny_sdxl
    builtin = load_model("builtin:tiny-sdxl", dtype="fp32", device="cpu")
    reference = _latents(builtin)

    # A state dict handed over with its owner's tokenizers (as a ComfyUI bridge would): the same model exactly.
    parts = sdxl_ckpt.components_from_sdxl_state_dict(state, builtin.tokenizer, builtin.tokenizer_2,
                                                      config_dir=config_dir, label="'tiny'")
    from_state = _assemble(parts, "tiny", CPU, torch.float32)
    assert from_state.backbone.name == "SDXL" and from_state.text_encoder_2 is not None
    assert torch.equal(_latents(from_state), reference)
    given = {t.untyped_storage().data_ptr() for t in state.values()}  # the modules own copies, not the caller's
    assert not any(p.untyped_storage().data_ptr() in given for name in PARTS for p in parts[name].parameters())

    # From a file both tokenizers come from the CLIP folder found, the second padding with "!" as SDXL's (and the
    # builtin's) does: the file's model samples exactly as the builtin does.
    path = _write(tmp_path, state)
    from_file = _assemble(sdxl_ckpt.load_checkpoint_file(path, config_dir=config_dir), path, CPU, torch.float32)
    assert from_file.tokenizer_2.pad_token == "!"
    assert torch.equal(_latents(from_file), reference)


def test_sd15_files_are_routed_to_the_sd15_loader(tmp_path, no_network):
    from ldm_layout import to_ldm_checkpoint

    components = build_tiny_components(str(tmp_path / "tokenizer_src"))
    config_dir = tmp_path / "configs"
    components["unet"].save_config(str(config_dir / "unet"))
    components["vae"].save_config(str(config_dir / "vae"))
    components["text_encoder"].config.save_pretrained(str(config_dir / "text_encoder"))
    (config_dir / "scheduler").mkdir()
    (config_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(components["scheduler_config"]))
    path = _write(tmp_path / "sd15", to_ldm_checkpoint(components["unet"], components["vae"],
                                                       components["text_encoder"]))
    loaded = sdxl_ckpt.load_checkpoint_file(path, config_dir=str(config_dir))
    assert set(loaded) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler_config"}
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(components[name], loaded[name])
    with pytest.raises(ValueError, match="only SD-1.5 checkpoints"):  # the shipped SD-1.5 configs: sizes differ
        sdxl_ckpt.load_checkpoint_file(path)


# --- refusals ----------------------------------------------------------------------------------------

def _refiner_state(components) -> dict:
    """SDXL refiner's layout: UNet, VAE and OpenCLIP bigG alone, under conditioner.embedders.0.model."""
    state = to_sgm_checkpoint(*(components[name] for name in PARTS))
    state = {k: v for k, v in state.items() if not k.startswith(("conditioner.",))}
    state.update(open_clip_to_sgm(components["text_encoder_2"].state_dict(), prefix=REFINER_OPEN_CLIP_PREFIX))
    return state


def test_refiner_is_refused_in_one_line(tiny_sdxl, tmp_path):
    components, config_dir, _ = tiny_sdxl
    refiner = _refiner_state(components)
    with pytest.raises(ValueError) as err:
        sdxl_ckpt.components_from_sdxl_state_dict(refiner, components["tokenizer"], components["tokenizer_2"],
                                                  config_dir=config_dir, label="'refiner'")
    message = str(err.value)
    assert message.startswith("'refiner' is an SDXL refiner") and "load the SDXL base checkpoint" in message
    assert "\n" not in message
    path = _write(tmp_path, refiner, "refiner.safetensors")
    with pytest.raises(ValueError) as err:  # through Load Model's own path: the refusal SD-1.5 loading gives
        load_model(path, device="cpu")
    assert str(err.value) == "'refiner.safetensors' is SDXL refiner, not SD-1.5: only SD-1.5 checkpoints are supported."


@pytest.mark.parametrize("key, how, message", [
    (OPEN_CLIP_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight", "float8",
     r"holds float8_e4m3fn weights \('conditioner\.embedders\.1\.model\.transformer\.resblocks\.0\.mlp\.c_fc"),
    (CLIP_L_PREFIX + "text_model.encoder.layers.0.mlp.fc1.scale_weight", "scale",
     r"holds quantisation scales \('conditioner\.embedders\.0\..*scale_weight'\): scaled-fp8"),
])
def test_quantised_text_encoders_are_refused(tiny_sdxl, key, how, message):
    components, config_dir, state = tiny_sdxl
    quantised = dict(state)
    if how == "float8":
        quantised[key] = state[key].to(torch.float8_e4m3fn)
    else:
        quantised[key] = torch.tensor(1.0)
    with pytest.raises(ValueError, match=message) as err:
        sdxl_ckpt.components_from_sdxl_state_dict(quantised, components["tokenizer"], components["tokenizer_2"],
                                                  config_dir=config_dir)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dropped, message", [
    (OPEN_CLIP_PREFIX + "ln_final.bias", "lacks second text encoder weights (1, e.g. "),
    (CLIP_L_PREFIX + "text_model.final_layer_norm.weight", "lacks text encoder weights (1, e.g. "),
    (UNET_PREFIX + "label_emb.0.2.bias", "lacks UNet weights"),
    (VAE_PREFIX + "decoder.conv_out.bias", "lacks VAE weights"),
])
def test_missing_weights_are_reported(tiny_sdxl, dropped, message):
    components, config_dir, state = tiny_sdxl
    partial = {k: v for k, v in state.items() if k != dropped}
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        sdxl_ckpt.components_from_sdxl_state_dict(partial, components["tokenizer"], components["tokenizer_2"],
                                                  config_dir=config_dir, label="'partial'")
    assert "SDXL checkpoint matching the configs" in str(err.value) and "\n" not in str(err.value)


def test_mismatched_or_missing_parts_fail_before_converting(tiny_sdxl, tmp_path):
    components, config_dir, state = tiny_sdxl
    # The tiny file against the shipped SDXL base configs: refused by what differs.
    path = _write(tmp_path, state)
    with pytest.raises(ValueError, match=r"has a UNet reading text features of width \[80\], not SDXL base's 2048"):
        sdxl_ckpt.load_checkpoint_file(path)
    no_second = {k: v for k, v in state.items() if not k.startswith(OPEN_CLIP_PREFIX)}
    no_second["conditioner.embedders.1.model.logit_scale"] = torch.tensor(1.0)  # keys say SDXL, the tower is gone
    with pytest.raises(ValueError, match="has no OpenCLIP bigG text encoder in SDXL's layout"):
        sdxl_ckpt.components_from_sdxl_state_dict(no_second, None, None, config_dir=config_dir)
    inpainting = dict(state)
    conv_in = state[UNET_PREFIX + "input_blocks.0.0.weight"]
    inpainting[UNET_PREFIX + "input_blocks.0.0.weight"] = torch.cat([conv_in, conv_in, conv_in[:, :1]], dim=1)
    with pytest.raises(ValueError, match="takes 9 latent channels"):
        sdxl_ckpt.components_from_sdxl_state_dict(inpainting, None, None, config_dir=config_dir)
    with pytest.raises(FileNotFoundError, match="lacks text_encoder_2/config.json"):
        sdxl_ckpt.load_sdxl_single_file(path, config_dir=ckpt.SD15_CONFIG_DIR)


# --- shipped SDXL configs ----------------------------------------------------------------------------

def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_sdxl():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL, subfolder="unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL, subfolder="text_encoder",
                                                                         local_files_only=True)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(
                SDXL, subfolder="text_encoder_2", local_files_only=True)),
        }


def test_shipped_configs_describe_sdxl_base_without_weights():
    from diffusers import EulerDiscreteScheduler

    meta = _meta_sdxl()
    unet, vae, clip_l, big_g = (meta[name] for name in PARTS)
    assert all(p.is_meta for m in meta.values() for p in m.parameters())
    assert abs(_count(unet) - 2.567e9) <= 0.01 * 2.567e9 and round(_count(unet) / 1e6, 1) == 2567.5
    assert len(unet.attn_processors) == 2 * 70  # 70 transformer blocks: 2x2x1 + 2x2x10 down, 10 mid, 3x2 + 3x10 up
    assert unet.config.cross_attention_dim == clip_l.config.hidden_size + big_g.config.hidden_size == 2048
    ids = 6 * unet.config.addition_time_embed_dim  # original size, crop, target size
    assert unet.add_embedding.linear_1.in_features == big_g.config.projection_dim + ids == 2816
    assert unet.config.sample_size * 8 == 1024
    assert round(_count(vae) / 1e6, 1) == 83.7 and vae.config.scaling_factor == 0.13025 and vae.config.force_upcast
    assert round(_count(clip_l) / 1e6, 1) == 123.1 and clip_l.config.hidden_act == "quick_gelu"
    g = big_g.config
    assert (g.hidden_size, g.num_hidden_layers, g.num_attention_heads, g.intermediate_size, g.projection_dim,
            g.hidden_act, g.vocab_size, g.max_position_embeddings) == (1280, 32, 20, 5120, 1280, "gelu", 49408, 77)
    assert round(_count(big_g) / 1e6, 1) == 694.7
    with open(os.path.join(SDXL, "model_index.json")) as f:
        assert FOLDER_FAMILIES[json.load(f)["_class_name"]] == "SDXL"
    with open(os.path.join(SDXL, "scheduler", "scheduler_config.json")) as f:
        scheduler = EulerDiscreteScheduler.from_config(json.load(f))
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1


def test_original_layout_of_sdxl_is_what_diffusers_expects():
    """The test helper's layout, checked on SDXL base's own shapes (meta) against diffusers' key markers and
    converters: the tiny round trip then stands for the real file."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )

    meta = _meta_sdxl()
    original = to_sgm_checkpoint(*(meta[name] for name in PARTS))
    assert infer_diffusers_model_type(original) == "xl_base" and ckpt._family(original) == "SDXL"
    assert original[OPEN_CLIP_PREFIX + "text_projection"].shape == (1280, 1280)
    assert original[OPEN_CLIP_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 1280, 1280)
    assert original[UNET_PREFIX + "label_emb.0.0.weight"].shape == (1280, 2816)
    back = convert_ldm_unet_checkpoint(original, dict(meta["unet"].config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in meta["unet"].state_dict().items()}
    back = convert_open_clip_checkpoint(meta["text_encoder_2"], original, prefix=OPEN_CLIP_PREFIX)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in meta["text_encoder_2"].state_dict().items()}
