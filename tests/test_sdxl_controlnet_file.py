"""SDXL ControlNets from single files: the tiny SDXL ControlNet saved as one file (diffusers layout and the original
`control_model.*` layout) loads back bit-identical, the shipped SDXL ControlNet config is SDXL base's, a file's keys
pick its family's config when no config folder is given, SD-1.5 files load as before, and a ControlNet of the other
family is refused by `ControlStack.check` before any step."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

from comfyui_video_edit.pipelines_core.models import controlnet as ctl
from comfyui_video_edit.pipelines_core.models.controlnet import (ControlStack, ControlUnit, load_controlnet,
                                                                 single_file_family)
from comfyui_video_edit.pipelines_core.models.model import load_model
from comfyui_video_edit.pipelines_core.models.tiny import tiny_controlnet, tiny_sdxl_controlnet
from ldm_layout import controlnet_to_ldm

SIZE = (32, 24)  # (height, width) of the hints


@pytest.fixture(scope="module")
def sdxl():
    return load_model("builtin:tiny-sdxl", dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def sd():
    return load_model("builtin:tiny", dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def xl_cn(sdxl):
    return tiny_sdxl_controlnet(sdxl.unet)


@pytest.fixture(scope="module")
def sd_cn(sd):
    return tiny_controlnet(sd.unet)


def _diffusers_layout(cn) -> dict:
    return {k: v.contiguous() for k, v in cn.state_dict().items()}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


# --- loading -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, prefix", [("diffusers", ""), ("ldm", ""), ("ldm", "control_model.")])
def test_sdxl_single_file_loads_back_bit_identical(xl_cn, tmp_path, no_network, layout, prefix):
    xl_cn.save_config(str(tmp_path / "config"))
    state = _diffusers_layout(xl_cn) if layout == "diffusers" else controlnet_to_ldm(xl_cn, prefix)
    assert single_file_family(state) == "SDXL"
    save_file(state, str(tmp_path / "cn_xl.safetensors"))
    loaded = load_controlnet(str(tmp_path / "cn_xl.safetensors"), "fp32", "cpu", config_dir=str(tmp_path / "config"))
    _same_weights(xl_cn, loaded)
    assert loaded.config.addition_embed_type == "text_time" and not loaded.training


def test_original_layout_sdxl_file_without_its_added_embedding_is_incomplete(xl_cn, tmp_path, no_network):
    """The added text/time embedding is loaded by us, not diffusers' converter: a file that lacks part of it is
    refused as incomplete, naming the SDXL family, rather than sampled with an unloaded embedding."""
    xl_cn.save_config(str(tmp_path / "config"))
    state = controlnet_to_ldm(xl_cn, "control_model.")
    state.pop("control_model.label_emb.0.2.weight")
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match="incomplete or not shaped like the ControlNet config.*pick an SDXL") as err:
        load_controlnet(str(tmp_path / "cut.safetensors"), config_dir=str(tmp_path / "config"))
    assert "\n" not in str(err.value)


def test_shipped_sdxl_config_is_sdxl_base_controlnet():
    sdxl_unet = str(ctl.Path(ctl.CONTROLNET_SDXL_CONFIG_DIR).parent / "sdxl")
    with torch.device("meta"):
        shipped = ControlNetModel.from_config(ControlNetModel.load_config(ctl.CONTROLNET_SDXL_CONFIG_DIR))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sdxl_unet, subfolder="unet"))
        of_unet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    # diffusers/controlnet-canny-sdxl-1.0: 1.25 B parameters
    assert round(sum(p.numel() for p in shipped.parameters()) / 1e9, 2) == 1.25
    assert {n: p.shape for n, p in shipped.named_parameters()} == {n: p.shape for n, p in of_unet.named_parameters()}
    config = shipped.config
    assert (config.addition_embed_type, config.addition_time_embed_dim, config.projection_class_embeddings_input_dim,
            config.cross_attention_dim) == ("text_time", 256, 2816, 2048)
    assert tuple(config.transformer_layers_per_block) == (1, 2, 10)
    assert tuple(config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    assert ctl.CONTROLNET_CONFIG_DIRS["SDXL"] == ctl.CONTROLNET_SDXL_CONFIG_DIR


def test_family_is_read_from_the_keys(xl_cn, sd_cn):
    assert single_file_family(_diffusers_layout(xl_cn)) == "SDXL"
    assert single_file_family(controlnet_to_ldm(xl_cn)) == "SDXL"
    assert single_file_family(controlnet_to_ldm(xl_cn, "control_model.")) == "SDXL"
    assert single_file_family(_diffusers_layout(sd_cn)) == "SD-1.5"
    assert single_file_family(controlnet_to_ldm(sd_cn, "control_model.")) == "SD-1.5"


@pytest.mark.parametrize("family", ["SDXL", "SD-1.5"])
def test_without_a_config_folder_the_files_family_config_is_used(xl_cn, sd_cn, tmp_path, no_network, family):
    """The shipped configs are full-size and the tiny files are not, so the choice shows in the refusal: the file is
    checked against its own family's shipped config (SDXL: 2048 wide, SD-1.5: 768), and the message names both."""
    cn = xl_cn if family == "SDXL" else sd_cn
    save_file(_diffusers_layout(cn), str(tmp_path / "cn.safetensors"))
    shipped = ControlNetModel.load_config(ctl.CONTROLNET_CONFIG_DIRS[family])
    width = cn.config.cross_attention_dim
    with pytest.raises(ValueError) as err:
        load_controlnet(str(tmp_path / "cn.safetensors"))
    message = str(err.value)
    assert "\n" not in message
    assert (f"is an {family} ControlNet for text features of width [{width}], not {shipped['cross_attention_dim']} "
            f"(the {family} config): pick an {family} ControlNet") in message, message


def test_sdxl_file_against_an_sd15_config_folder_names_both(xl_cn, sd_cn, tmp_path, no_network):
    """A config folder is obeyed, and an SDXL file given an SD-1.5 config is refused naming both families."""
    config = {**dict(sd_cn.config), "cross_attention_dim": xl_cn.config.cross_attention_dim}
    ControlNetModel.from_config(config).save_config(str(tmp_path / "config"))
    save_file(_diffusers_layout(xl_cn), str(tmp_path / "cn_xl.safetensors"))
    with pytest.raises(ValueError, match="is an SDXL ControlNet but the config is SD-1.5's"):
        load_controlnet(str(tmp_path / "cn_xl.safetensors"), config_dir=str(tmp_path / "config"))


@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_sd15_single_file_still_loads(sd_cn, tmp_path, no_network, layout):
    sd_cn.save_config(str(tmp_path / "config"))
    state = _diffusers_layout(sd_cn) if layout == "diffusers" else controlnet_to_ldm(sd_cn, "control_model.")
    save_file(state, str(tmp_path / "cn.safetensors"))
    loaded = load_controlnet(str(tmp_path / "cn.safetensors"), config_dir=str(tmp_path / "config"))
    _same_weights(sd_cn, loaded)
    assert loaded.config.addition_embed_type is None


# --- the other family refused before any step -------------------------------------------------------------

def test_stack_check_refuses_the_other_family_given_the_model(sdxl, sd, xl_cn, sd_cn):
    hints = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    cases = ((sdxl, sd_cn, "SD-1.5", "SDXL"), (sd, xl_cn, "SDXL", "SD-1.5"))
    for model, cn, cn_family, model_family in cases:
        stack = ControlStack().add(ControlUnit(sd_cn if model is sd else xl_cn, hints, name="own"))
        stack = stack.add(ControlUnit(cn, hints, name="other_family"))
        stack.check(2, SIZE)  # without the model only the hints are checked (the first UNet call checks widths)
        with pytest.raises(ValueError) as err:
            stack.check(2, SIZE, model)
        message = str(err.value)
        assert "\n" not in message
        assert (f"ControlNet #2 'other_family' expects text features of width {cn.config.cross_attention_dim} but "
                f"the model gives {model.unet.config.cross_attention_dim}: it is an {cn_family} ControlNet and the "
                f"model is {model_family}") in message, message
    ControlStack().add(ControlUnit(xl_cn, hints)).check(2, SIZE, sdxl)  # same family: passes
    ControlStack().add(ControlUnit(sd_cn, hints)).check(2, SIZE, sd)
