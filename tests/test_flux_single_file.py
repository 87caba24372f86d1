"""Flux.1 from ComfyUI's single files: builtin:tiny-flux written as transformer (BFL layout), ae, clip_l and t5xxl
files and read back offline gives the same weights and the same edit; dev/schnell told apart by the weights; missing
parts and quantised files refused in one line; the shipped configs build FLUX.1-sized modules."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from comfyui_video_edit.pipelines_core.models import flux_single_file as fsf
from comfyui_video_edit.pipelines_core.models.model import _assemble, load_model
from comfyui_video_edit.pipelines_core.models.tiny import TINY_SEED, build_tiny_flux_components, write_tiny_tokenizer
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

from flux_layout import SCHNELL_SCHEDULER, clip_to_comfy, t5_to_comfy, transformer_to_bfl, vae_to_ae, write_configs
from ldm_layout import to_ldm_checkpoint

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CPU = torch.device("cpu")
COMFY_T5_TOKENIZER = "/work/comfyui/comfy/text_encoders/t5_tokenizer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """builtin:tiny-flux's components, config folders for their sizes, and their four single-file state dicts."""
    root = tmp_path_factory.mktemp("tiny_flux")
    components = build_tiny_flux_components(str(root / "tokenizer"))
    configs = fsf.FluxConfigs(write_configs(str(root / "configs"), components), str(root / "configs" / "clip-l"))
    files = {"flux1-dev.safetensors": transformer_to_bfl(components["unet"].transformer.state_dict()),
             "ae.safetensors": vae_to_ae(components["vae"].state_dict()),
             "clip_l.safetensors": clip_to_comfy(components["text_encoder"]),
             "t5xxl_fp16.safetensors": t5_to_comfy(components["text_encoder_2"])}
    return components, configs, files, str(root / "tokenizer")


def _write(folder, files: dict) -> dict:
    os.makedirs(folder, exist_ok=True)
    for name, state in files.items():
        save_file(state, os.path.join(folder, name))
    return {name: os.path.join(folder, name) for name in files}


def _load(tiny, transformer, parts, dtype=torch.float32):
    _components, configs, _files, tokenizer = tiny
    return fsf.load_flux_single_files(transformer, parts["vae"], parts["clip"], parts["t5"], tokenizer, tokenizer,
                                      torch_dtype=dtype, configs=configs)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


# --- round trip --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_four_single_files_load_exact_weights_and_edit_like_builtin_tiny_flux(tiny, tmp_path, no_network, prefix):
    components, _configs, files, _tok = tiny
    files = {**files, "flux1-dev.safetensors": {prefix + k: v for k, v in files["flux1-dev.safetensors"].items()}}
    paths = _write(tmp_path, files)
    parts = fsf.find_flux_parts(paths["flux1-dev.safetensors"])
    assert parts == {"vae": paths["ae.safetensors"], "clip": paths["clip_l.safetensors"],
                     "t5": paths["t5xxl_fp16.safetensors"]}
    loaded = _load(tiny, paths["flux1-dev.safetensors"], parts)
    assert set(loaded) == {*PARTS, "tokenizer", "tokenizer_2", "scheduler_config"}
    for name in PARTS:
        _assert_same_weights(loaded[name], components[name])
    assert loaded["unet"].config.guidance_embeds and loaded["scheduler_config"] == components["scheduler_config"]
    assert loaded["vae"].config.shift_factor == components["vae"].config.shift_factor

    model = _assemble(loaded, "flux single files", CPU, torch.float32)
    builtin = load_model("builtin:tiny-flux", dtype="fp32", device="cpu")
    assert model.backbone is builtin.backbone and model.kind == builtin.kind
    frames = torch.rand(2, 64, 48, 3, generator=torch.Generator().manual_seed(4))
    s = SamplerSettings("a red fox in the snow", seed=7, steps=2, cfg=3.5, scheduler="flow_euler", strength=0.8,
                        attention="none")
    ours, ref = edit_video(model, s, frames), edit_video(builtin, s, frames)
    assert torch.equal(ours, ref)
    assert not torch.equal(ref, edit_video(builtin, SamplerSettings("a blue car", seed=7, steps=2, cfg=3.5,
                                                                    scheduler="flow_euler", strength=0.8,
                                                                    attention="none"), frames))


def test_the_tiny_transformer_is_not_in_diffusers_layout(tiny):
    """The file is really BFL's: fused q/k/v, BFL's names; diffusers' own key detection calls it Flux."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    _c, _cfg, files, _tok = tiny
    state = files["flux1-dev.safetensors"]
    assert "double_blocks.0.img_attn.qkv.weight" in state and "single_blocks.0.linear1.weight" in state
    assert not any(k.startswith(("transformer_blocks.", "x_embedder")) for k in state)
    assert fsf.is_flux_transformer(state) and fsf.flux_variant(state) == "dev"
    assert infer_diffusers_model_type(state) == "flux-dev"
    assert not fsf.is_flux_transformer(files["ae.safetensors"])


def test_single_block_split_is_diffusers_own_at_flux1_width(tiny):
    """At other widths the fused linear1 is split by `split_linear1`; at FLUX.1's (3072) diffusers splits it: the two
    agree there, so the tiny model's path maps the weights as diffusers maps FLUX.1's."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    _c, _cfg, files, _tok = tiny
    state = dict(files["flux1-dev.safetensors"])
    rows = 3072 * 7
    state["single_blocks.0.linear1.weight"] = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2)
    state["single_blocks.0.linear1.bias"] = -torch.arange(rows, dtype=torch.float32)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    for leaf in ("weight", "bias"):
        ours = fsf.split_linear1(state[f"single_blocks.0.linear1.{leaf}"], 3072)
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ours):
            assert torch.equal(theirs[f"single_transformer_blocks.0.{name}.{leaf}"], part), (name, leaf)
    flux1 = {"num_attention_heads": 24, "attention_head_dim": 128}
    converted, unknown = fsf.transformer_to_diffusers(state, flux1)  # FLUX.1 width: diffusers' split untouched
    assert not unknown and torch.equal(converted["single_transformer_blocks.0.proj_mlp.bias"], theirs[
        "single_transformer_blocks.0.proj_mlp.bias"])
    assert "single_blocks.0.linear1.weight" in state  # the caller's dict is not consumed


# --- dev and schnell ---------------------------------------------------------------------------------

def test_a_transformer_without_guidance_in_is_schnell_with_schnells_scheduler(tiny, tmp_path):
    from diffusers import FluxTransformer2DModel

    components, configs, _files, _tok = tiny
    config = dict(components["unet"].transformer.config, guidance_embeds=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 99)
        schnell = FluxTransformer2DModel.from_config(config).eval()
    state = transformer_to_bfl(schnell.state_dict())
    assert not any(k.startswith("guidance_in.") for k in state)
    assert fsf.is_flux_transformer(state) and fsf.flux_variant(state) == "schnell"
    transformer, variant, scheduler = fsf.load_flux_transformer(state, configs, torch.float32, "'schnell'")
    assert variant == "schnell" and not transformer.config.guidance_embeds
    assert scheduler == SCHNELL_SCHEDULER != components["scheduler_config"]
    _assert_same_weights(transformer, schnell)


def test_shipped_scheduler_configs_differ_as_dev_and_schnell_do():
    shipped = fsf.FluxConfigs()
    dev, schnell = (json.load(open(os.path.join(shipped.variant(v), "scheduler", "scheduler_config.json")))
                    for v in ("dev", "schnell"))
    assert dev["use_dynamic_shifting"] and (dev["base_shift"], dev["max_shift"], dev["shift"]) == (0.5, 1.15, 3.0)
    assert (dev["base_image_seq_len"], dev["max_image_seq_len"]) == (256, 4096)
    assert not schnell["use_dynamic_shifting"] and schnell["shift"] == 1.0


# --- finding the parts ---------------------------------------------------------------------------------

def test_parts_are_found_in_search_folders_unquantised_first_and_missing_ones_named(tiny, tmp_path):
    _c, _cfg, files, _tok = tiny
    transformer = _write(tmp_path / "diffusion_models", {"flux1-dev.safetensors": files["flux1-dev.safetensors"]})
    vae_dir, te_dir = tmp_path / "vae", tmp_path / "text_encoders"
    _write(vae_dir, {"ae.safetensors": files["ae.safetensors"]})
    _write(te_dir, {"t5xxl_fp8_e4m3fn.safetensors": {"x": torch.zeros(1)},
                    "t5xxl_fp16.safetensors": files["t5xxl_fp16.safetensors"]})
    path = transformer["flux1-dev.safetensors"]
    with pytest.raises(FileNotFoundError) as err:
        fsf.find_flux_parts(path, [str(vae_dir), str(te_dir)])
    message = str(err.value)
    assert "CLIP-L (clip_l*.safetensors)" in message and "T5" not in message and "VAE" not in message
    assert str(te_dir) in message and str(tmp_path / "diffusion_models") in message and "\n" not in message
    _write(te_dir, {"clip_l.safetensors": files["clip_l.safetensors"]})
    parts = fsf.find_flux_parts(path, [str(vae_dir), str(te_dir)])
    assert parts == {"vae": str(vae_dir / "ae.safetensors"), "clip": str(te_dir / "clip_l.safetensors"),
                     "t5": str(te_dir / "t5xxl_fp16.safetensors")}
    with pytest.raises(FileNotFoundError, match=r"needs VAE \(ae\*\.safetensors\), CLIP-L .*T5-XXL"):
        fsf.find_flux_parts(path)


def test_t5_tokenizer_is_found_next_to_the_t5_file_or_in_comfyuis_folder(tmp_path):
    from transformers import AutoTokenizer

    t5 = tmp_path / "t5xxl_fp16.safetensors"
    with pytest.raises(FileNotFoundError, match="No T5 tokenizer found for 't5xxl_fp16.safetensors'"):
        fsf.find_t5_tokenizer_dir(str(t5))
    source = write_tiny_tokenizer(str(tmp_path / "src"))
    AutoTokenizer.from_pretrained(source).save_pretrained(str(tmp_path / "t5_tokenizer"))  # writes tokenizer.json
    assert fsf.find_t5_tokenizer_dir(str(t5)) == str(tmp_path / "t5_tokenizer")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json or spiece.model"):
        fsf.find_t5_tokenizer_dir(str(t5), source)
    if os.path.isdir(COMFY_T5_TOKENIZER):  # ComfyUI's own, as a ComfyUI install gives it
        found = fsf.find_t5_tokenizer_dir(str(tmp_path / "elsewhere" / "t5.safetensors"),
                                          extra_candidates=[COMFY_T5_TOKENIZER])
        tokenizer = fsf.load_t5_tokenizer(found)
        assert tokenizer("a cat").input_ids == [3, 9, 1712, 1] and tokenizer.model_max_length == 512


# --- refusals ------------------------------------------------------------------------------------------

def test_fp8_transformer_gguf_and_scaled_fp8_t5_are_refused_naming_the_file(tiny, tmp_path):
    _c, _cfg, files, _tok = tiny
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in files["flux1-dev.safetensors"].items()}
    paths = _write(tmp_path, {**files, "flux1-dev-fp8.safetensors": fp8})
    parts = fsf.find_flux_parts(paths["flux1-dev.safetensors"])
    with pytest.raises(ValueError, match=r"'flux1-dev-fp8.safetensors' holds float8_e4m3fn weights"):
        _load(tiny, paths["flux1-dev-fp8.safetensors"], parts)
    gguf = tmp_path / "flux1-dev-Q4_K_S.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"'flux1-dev-Q4_K_S.gguf' is a GGUF-quantised transformer"):
        _load(tiny, str(gguf), parts)
    t5 = files["t5xxl_fp16.safetensors"]
    scaled = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in t5.items()}
    scaled.update({"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
                   "encoder.block.0.layer.0.SelfAttention.q.scale_weight": torch.ones(())})
    scaled_path = _write(tmp_path, {"t5xxl_fp8_e4m3fn_scaled.safetensors": scaled})
    with pytest.raises(ValueError, match=r"'t5xxl_fp8_e4m3fn_scaled.safetensors' holds"):
        _load(tiny, paths["flux1-dev.safetensors"], {**parts, "t5": scaled_path["t5xxl_fp8_e4m3fn_scaled.safetensors"]})


def test_a_plain_fp8_t5_is_upcast_exactly(tiny, tmp_path):
    components, configs, files, _tok = tiny
    t5 = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v
          for k, v in files["t5xxl_fp16.safetensors"].items()}
    path = _write(tmp_path, {"t5xxl_fp8_e4m3fn.safetensors": t5})["t5xxl_fp8_e4m3fn.safetensors"]
    loaded = fsf.load_flux_t5(fsf.read_state_dict(path), configs, torch.float32, "'t5xxl_fp8_e4m3fn.safetensors'")
    reference = components["text_encoder_2"].state_dict()
    for name, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, reference[name].to(torch.float8_e4m3fn).float()), name
    assert not torch.equal(loaded.shared.weight, reference["shared.weight"])  # fp8 lost precision; we kept what it had


def test_wrong_files_in_each_slot_are_refused_by_name(tiny, tmp_path):
    from comfyui_video_edit.pipelines_core.models.tiny import build_tiny_components

    components, _cfg, files, _tok = tiny
    sd = build_tiny_components(str(tmp_path / "sd_tok"))
    ldm = to_ldm_checkpoint(sd["unet"], sd["vae"], sd["text_encoder"])
    sd_vae = {k.removeprefix("first_stage_model."): v for k, v in ldm.items() if k.startswith("first_stage_model.")}
    fill = dict(files["flux1-dev.safetensors"])
    fill["img_in.weight"] = torch.zeros(fill["img_in.weight"].shape[0], 384)
    paths = _write(tmp_path, {**files, "sd15.safetensors": ldm, "sd_vae.safetensors": sd_vae,
                              "flux1-fill-dev.safetensors": fill})
    parts = fsf.find_flux_parts(paths["flux1-dev.safetensors"])
    cases = [
        (paths["sd15.safetensors"], parts, r"'sd15.safetensors' is not a FLUX.1 transformer"),
        (paths["flux1-fill-dev.safetensors"], parts,
         r"'flux1-fill-dev.safetensors' reads 384 input channels \(Flux Fill\)"),
        (paths["flux1-dev.safetensors"], {**parts, "vae": paths["sd_vae.safetensors"]},
         r"'sd_vae.safetensors' is a VAE with 4 latent channels, not Flux's 16"),
        (paths["flux1-dev.safetensors"], {**parts, "clip": paths["t5xxl_fp16.safetensors"]},
         r"'t5xxl_fp16.safetensors' holds no CLIP text model"),
        (paths["flux1-dev.safetensors"], {**parts, "t5": paths["clip_l.safetensors"]},
         r"'clip_l.safetensors' holds no T5 encoder"),
    ]
    for transformer, given, message in cases:
        with pytest.raises(ValueError, match=message):
            _load(tiny, transformer, given)


def test_an_incomplete_transformer_is_refused_in_one_line(tiny, tmp_path):
    _c, configs, files, _tok = tiny
    state = {k: v for k, v in files["flux1-dev.safetensors"].items() if k != "double_blocks.0.txt_mlp.2.bias"}
    with pytest.raises(ValueError, match=r"'cut.safetensors' lacks FLUX.1 transformer weights "
                                         r"\(e.g. double_blocks.0.txt_mlp.2.bias\)"):
        fsf.load_flux_transformer(state, configs, torch.float32, "'cut.safetensors'")


# --- the shipped configs ---------------------------------------------------------------------------------

# FLUX.1's published sizes: transformer 11.9 B (dev; schnell lacks the guidance embedder), T5-XXL encoder 4.76 B,
# autoencoder 83.8 M, CLIP ViT-L/14 text model 123 M.
FLUX1_SIZES = {"dev": 11.90e9, "schnell": 11.89e9, "vae": 83.8e6, "t5": 4.762e9, "clip": 123.06e6}


def test_shipped_configs_build_flux1_sized_modules_on_the_meta_device():
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    shipped = fsf.FluxConfigs()
    shipped.check()

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        sizes = {v: count(FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(
            shipped.variant(v), subfolder="transformer"))) for v in ("dev", "schnell")}
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(shipped.vae))
        sizes["vae"] = count(vae)
        sizes["t5"] = count(T5EncoderModel(T5Config.from_pretrained(shipped.t5)))
        sizes["clip"] = count(CLIPTextModel(CLIPTextConfig.from_pretrained(shipped.clip)))
    for name, want in FLUX1_SIZES.items():
        assert abs(sizes[name] - want) / want < 0.01, (name, sizes[name])
    assert (vae.config.latent_channels, vae.config.scaling_factor, vae.config.shift_factor) == (16, 0.3611, 0.1159)
    assert not vae.config.use_quant_conv and not vae.config.use_post_quant_conv


def test_a_flux1_width_transformer_goes_through_diffusers_own_split_with_the_shipped_config():
    """FLUX.1's width (3072, the shipped dev config) with one block of each kind (a ~0.5 B bf16 stand-in for the
    12 B file): the converter's own split runs, the block counts come from the file, and the weights land exactly."""
    from diffusers import FluxTransformer2DModel

    shipped = fsf.FluxConfigs()
    config = dict(FluxTransformer2DModel.load_config(shipped.variant("dev"), subfolder="transformer"),
                  num_layers=1, num_single_layers=1)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer2DModel.from_config(config).state_dict().items()}
    g = torch.Generator().manual_seed(5)
    state = {k: torch.randn(shape, generator=g, dtype=torch.bfloat16) for k, shape in shapes.items()}
    transformer, variant, scheduler = fsf.load_flux_transformer(transformer_to_bfl(state, "model.diffusion_model."),
                                                                shipped, torch.bfloat16, "'flux1-dev-1+1.safetensors'")
    assert variant == "dev" and scheduler["use_dynamic_shifting"]
    assert (transformer.config.num_layers, transformer.config.num_single_layers) == (1, 1)
    assert transformer.config.num_attention_heads * transformer.config.attention_head_dim == fsf.FLUX1_WIDTH
    loaded = transformer.state_dict()
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], value), name


def test_load_flux_model_finds_parts_and_tokenizers_as_comfyui_keeps_them(tiny, tmp_path, no_network):
    """diffusion_models/ holds the transformer, vae/ and text_encoders/ the rest; CLIP's tokenizer is a candidate
    folder (ComfyUI's sd1_tokenizer), T5's a t5_tokenizer folder beside the T5 file. The file is recognised from its
    header, and a .safetensors that is not a Flux transformer is not."""
    from transformers import AutoTokenizer

    components, configs, files, tokenizer = tiny
    transformer = _write(tmp_path / "diffusion_models", {"flux1-dev.safetensors": files["flux1-dev.safetensors"]})
    vae = _write(tmp_path / "vae", {"ae.safetensors": files["ae.safetensors"]})
    _write(tmp_path / "text_encoders", {k: files[k] for k in ("clip_l.safetensors", "t5xxl_fp16.safetensors")})
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(str(tmp_path / "text_encoders" / "t5_tokenizer"))
    path = transformer["flux1-dev.safetensors"]
    assert fsf.is_flux_transformer_file(path) and not fsf.is_flux_transformer_file(vae["ae.safetensors"])
    with pytest.raises(FileNotFoundError, match="No CLIP tokenizer found for 'clip_l.safetensors'"):
        fsf.load_flux_model(path, search_dirs=[str(tmp_path / "vae"), str(tmp_path / "text_encoders")],
                            configs=configs)
    loaded = fsf.load_flux_model(path, search_dirs=[str(tmp_path / "vae"), str(tmp_path / "text_encoders")],
                                 clip_tokenizer_candidates=[tokenizer], configs=configs)
    for name in PARTS:
        _assert_same_weights(loaded[name], components[name])
    prompt = "a red fox in the snow"
    assert loaded["tokenizer_2"](prompt).input_ids == components["tokenizer_2"](prompt).input_ids
    assert loaded["tokenizer"](prompt).input_ids == components["tokenizer"](prompt).input_ids
