"""Use ComfyUI Model: a VE_MODEL from a state dict in the original SD-1.x, SDXL base or FLUX.1 layout.

ComfyUI hands its loaded model over as that state dict (what its checkpoint save writes). The engine must
build from it exactly the model Load Model builds from the same weights in a file (SDXL: the model
builtin:tiny-sdxl is; Flux: builtin:tiny-flux, which Load Model also gives from its four single files), own its
weights (ComfyUI patches and unpatches its tensors later), leave the caller's tensors and tokenizers alone, and
refuse in one line what the configs cannot describe. The node's ComfyUI half runs against a real ComfyUI only when
COMFYUI_PATH names a checkout (in a subprocess: ComfyUI's modules must not leak into this test session).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from comfyui_video_edit.pipelines_core.models import single_file as ckpt
from comfyui_video_edit.pipelines_core.models.model import DTYPES, encode_text, load_model, model_from_state_dict
from comfyui_video_edit.pipelines_core.models.tiny import (
    build_tiny_components,
    build_tiny_sdxl_components,
    write_tiny_tokenizer,
)
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

from ldm_layout import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, to_ldm_checkpoint
from ldm_layout_sdxl import CLIP_L_PREFIX, OPEN_CLIP_PREFIX, to_sgm_checkpoint

COMFY_TOKENIZER_LIMIT = 8192  # what ComfyUI's own CLIP tokenizer says (comfy/sd1_tokenizer)


def _write_configs(folder, unet, vae, text_encoder, scheduler_config) -> str:
    """The components' configs as a diffusers-style config folder (what configs/sd15 is for SD-1.5)."""
    unet.save_config(os.path.join(folder, "unet"))
    vae.save_config(os.path.join(folder, "vae"))
    text_encoder.config.save_pretrained(os.path.join(folder, "text_encoder"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config, f)
    return folder


def _comfy_layout(file_state: dict) -> dict:
    """What ComfyUI's `state_dict_for_saving` gives for SD-1.x: the three model prefixes only, CLIP under
    `text_model.`, no position_ids buffer (ComfyUI's CLIP has none) and no schedule buffers."""
    return {k: v for k, v in file_state.items()
            if k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)) and not k.endswith("position_ids")}


def _comfy_sdxl_layout(file_state: dict) -> dict:
    """What ComfyUI's `state_dict_for_saving` gives for SDXL (supported_models.SDXL): SDXL's single-file layout
    (ldm_layout_sdxl) less the schedule buffers. Unlike SD-1.x it keeps CLIP-L's position_ids (it writes
    arange(77) itself) and OpenCLIP's logit_scale (its CLIP has one)."""
    return {k: v for k, v in file_state.items()
            if k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_PREFIX))}


def _tokenizer(folder: str, limit: int, **kwargs):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    tokenizer.model_max_length = limit
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge")
    components = build_tiny_components(str(root / "tokenizer"))
    config_dir = _write_configs(str(root / "configs"), components["unet"], components["vae"],
                                components["text_encoder"], components["scheduler_config"])
    file_state = to_ldm_checkpoint(components["unet"], components["vae"], components["text_encoder"])
    path = str(root / "model" / "tiny.safetensors")
    os.makedirs(os.path.dirname(path))
    save_file(file_state, path)
    write_tiny_tokenizer(str(root / "model" / "tokenizer"))  # Load Model's tokenizer, next to the file
    return {"components": components, "config_dir": config_dir, "path": path, "tokenizer_dir": str(root / "tokenizer"),
            "comfy_state": _comfy_layout(file_state)}


def _inputs(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    z = torch.randn(1, 4, 8, 8, generator=g)
    return x, torch.tensor([10, 500]), text, z


def _assert_same_module(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --- the state-dict path builds what the file path builds -------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_state_dict_gives_the_model_load_model_gives_from_the_file(tiny, no_network, dtype):
    # Load Model's single-file path (read file -> state dict -> conversion), with the tiny configs.
    from_file = ckpt.load_single_file(tiny["path"], config_dir=tiny["config_dir"], torch_dtype=DTYPES[dtype])
    comfy_tokenizer = _tokenizer(tiny["tokenizer_dir"], COMFY_TOKENIZER_LIMIT)

    model = model_from_state_dict(tiny["comfy_state"], comfy_tokenizer, dtype=dtype, device="cpu",
                                  source="comfyui:test", config_dir=tiny["config_dir"])

    assert model.dtype == DTYPES[dtype] and model.source == "comfyui:test"
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_module(getattr(model, name), from_file[name])
        assert not getattr(model, name).training
    assert model.scheduler_config == from_file["scheduler_config"]
    x, t, text, z = _inputs(model.unet)
    with torch.no_grad():
        x, text, z = x.to(model.dtype), text.to(model.dtype), z.to(model.dtype)
        assert torch.equal(model.unet(x, t, text).sample, from_file["unet"](x, t, text).sample)
        assert torch.equal(model.vae.decode(z).sample, from_file["vae"].decode(z).sample)
        ids = model.tokenizer("a red car", padding="max_length", return_tensors="pt").input_ids
        file_ids = from_file["tokenizer"]("a red car", padding="max_length", return_tensors="pt").input_ids
        assert ids.shape == (1, 77) and torch.equal(ids, file_ids)  # capped at the text encoder's 77 positions
        assert torch.equal(model.text_encoder(ids)[0], from_file["text_encoder"](ids)[0])
    if dtype == "fp32":  # and both are the original diffusers weights, bit for bit
        for name in ("unet", "vae", "text_encoder"):
            _assert_same_module(getattr(model, name), tiny["components"][name])


def test_weights_are_owned_and_the_inputs_are_left_alone(tiny):
    state = {k: v.clone() for k, v in tiny["comfy_state"].items()}  # this test changes it afterwards
    snapshot = {k: v.clone() for k, v in state.items()}
    comfy_tokenizer = _tokenizer(tiny["tokenizer_dir"], COMFY_TOKENIZER_LIMIT)

    model = model_from_state_dict(state, comfy_tokenizer, dtype="fp32", device="cpu", config_dir=tiny["config_dir"])

    assert state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in state)
    assert comfy_tokenizer.model_max_length == COMFY_TOKENIZER_LIMIT  # ComfyUI's object is shared: not capped in place
    assert model.tokenizer is not comfy_tokenizer and model.tokenizer.model_max_length == 77
    theirs = {v.untyped_storage().data_ptr() for v in state.values()}
    modules = (model.unet, model.vae, model.text_encoder)
    ours = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    assert not theirs & {t.untyped_storage().data_ptr() for t in ours}
    # What ComfyUI may do to its tensors later (hook patches write into them in place) must not reach the model.
    before = [t.clone() for t in ours]
    for value in state.values():
        if value.is_floating_point():
            value.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(ours, before))


# --- SDXL: the state dict ComfyUI's SDXL gives builds builtin:tiny-sdxl -----------------------------------

SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _write_sdxl_configs(folder, components) -> str:
    """An SDXL model's component configs as a diffusers-style folder (what configs/sdxl is for SDXL base)."""
    _write_configs(folder, components["unet"], components["vae"], components["text_encoder"],
                   components["scheduler_config"])
    components["text_encoder_2"].config.save_pretrained(os.path.join(folder, "text_encoder_2"))
    return folder


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge_sdxl")
    components = build_tiny_sdxl_components(str(root / "tokenizer"))
    config_dir = _write_sdxl_configs(str(root / "configs"), components)
    state = _comfy_sdxl_layout(to_sgm_checkpoint(*(components[name] for name in SDXL_PARTS)))
    return {"components": components, "config_dir": config_dir, "tokenizer_dir": str(root / "tokenizer"),
            "comfy_state": state}


def _sdxl_tokenizers(folder: str, limit: int = COMFY_TOKENIZER_LIMIT):
    """ComfyUI's SDXL CLIP-L tokenizer as it is, and the copy of its clip_g one that pads with "!" (what the
    node hands over)."""
    return _tokenizer(folder, limit), _tokenizer(folder, limit, pad_token="!")


def _sdxl_latents(model) -> torch.Tensor:
    s = SamplerSettings("a red fox in the snow", "blurry", seed=5, steps=2, cfg=6.0, scheduler="euler",
                        attention="none")
    return edit_video(model, s, frame_count=2, size=(64, 48))


def test_sdxl_state_dict_gives_builtin_tiny_sdxl(tiny_sdxl, no_network):
    builtin = load_model("builtin:tiny-sdxl", dtype="fp32", device="cpu")
    tokenizer, tokenizer_2 = _sdxl_tokenizers(tiny_sdxl["tokenizer_dir"])
    state = tiny_sdxl["comfy_state"]
    snapshot = {k: v.clone() for k, v in state.items()}

    model = model_from_state_dict(state, tokenizer, dtype="fp32", device="cpu", source="comfyui:SDXL",
                                  config_dir=tiny_sdxl["config_dir"], tokenizer_2=tokenizer_2)

    assert model.backbone.name == "SDXL" and model.source == "comfyui:SDXL"
    for name in SDXL_PARTS:
        _assert_same_module(getattr(model, name), getattr(builtin, name))
        assert not getattr(model, name).training
    assert model.scheduler_config == builtin.scheduler_config
    # Both tokenizers capped to 77 on copies; the second pads with "!" as the builtin's (SDXL's) does.
    assert tokenizer.model_max_length == tokenizer_2.model_max_length == COMFY_TOKENIZER_LIMIT
    assert model.tokenizer.model_max_length == model.tokenizer_2.model_max_length == 77
    assert model.tokenizer_2.pad_token == builtin.tokenizer_2.pad_token == "!"
    for ours, theirs in ((model.tokenizer, builtin.tokenizer), (model.tokenizer_2, builtin.tokenizer_2)):
        ids, want = (t("a red fox", padding="max_length", truncation=True, return_tensors="pt").input_ids
                     for t in (ours, theirs))
        assert torch.equal(ids, want)
    prompt, reference = encode_text(model, "a red fox"), encode_text(builtin, "a red fox")
    assert torch.equal(prompt.hidden, reference.hidden) and torch.equal(prompt.pooled, reference.pooled)
    assert torch.equal(_sdxl_latents(model), _sdxl_latents(builtin))
    # The caller's tensors are left alone and not shared.
    assert all(torch.equal(state[k], snapshot[k]) for k in state)
    theirs = {v.untyped_storage().data_ptr() for v in state.values()}
    assert not any(p.untyped_storage().data_ptr() in theirs for name in SDXL_PARTS
                   for p in getattr(model, name).parameters())


def test_sdxl_state_dict_needs_its_second_tokenizer_and_sdxl_configs(tiny_sdxl):
    tokenizer, tokenizer_2 = _sdxl_tokenizers(tiny_sdxl["tokenizer_dir"])
    with pytest.raises(ValueError) as err:
        model_from_state_dict(tiny_sdxl["comfy_state"], tokenizer, device="cpu", source="comfyui:SDXL",
                              config_dir=tiny_sdxl["config_dir"])
    assert str(err.value) == ("'comfyui:SDXL' is SDXL: its second tokenizer (tokenizer_2, padding with '!') is "
                              "needed too.")
    # Without a config folder it goes to the shipped SDXL base configs (not SD-1.5's), which the tiny model does not
    # match: refused by what differs, before any conversion.
    with pytest.raises(ValueError, match=r"^'comfyui:SDXL' has a UNet reading text features of width \[80\], not "
                                         r"SDXL base's 2048"):
        model_from_state_dict(tiny_sdxl["comfy_state"], tokenizer, device="cpu", source="comfyui:SDXL",
                              tokenizer_2=tokenizer_2)


# --- refusals ----------------------------------------------------------------------------------------

class GGMLTensor(torch.Tensor):
    """Stands for a GGUF loader's tensor subclass (ComfyUI-GGUF's has this name)."""


def _quantised(state: dict, how: str) -> dict:
    state = dict(state)
    key = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    if how == "float8":
        state[key] = state[key].to(torch.float8_e4m3fn)
    elif how == "scaled_fp8":  # ComfyUI's scaled fp8: a scale per weight, fp32
        state[key[: -len("weight")] + "scale_weight"] = torch.tensor(1.0)
    elif how == "gguf":
        state[key] = state[key].as_subclass(GGMLTensor)
    return state


@pytest.mark.parametrize("how, message", [
    ("float8", r"holds float8_e4m3fn weights \('model\.diffusion_model\.input_blocks\.1\.1\..*quantised \(fp8\)"),
    ("scaled_fp8", r"holds quantisation scales \('.*attn1\.to_q\.scale_weight'\): scaled-fp8"),
    ("gguf", r"holds quantised tensors \(GGMLTensor at '.*attn1\.to_q\.weight', e\.g\. GGUF\)"),
])
def test_quantised_weights_are_refused_in_one_line(tiny, how, message):
    state = _quantised(tiny["comfy_state"], how)
    tokenizer = _tokenizer(tiny["tokenizer_dir"], 77)
    with pytest.raises(ValueError, match=message) as err:
        model_from_state_dict(state, tokenizer, dtype="fp32", device="cpu", source="comfyui:SD15",
                              config_dir=tiny["config_dir"])
    assert str(err.value).startswith("'comfyui:SD15' holds ") and "\n" not in str(err.value)


def _keys(*names_and_shapes) -> dict:
    return {name: torch.zeros(shape) for name, shape in names_and_shapes}


_UNET_IN = (UNET_PREFIX + "input_blocks.0.0.weight", (8, 4, 3, 3))
_VAE_IN = (VAE_PREFIX + "encoder.conv_in.weight", (8, 3, 3, 3))
OTHER_FAMILIES = {  # SDXL base converts (above); its refiner does not
    "SDXL refiner": _keys(_UNET_IN, _VAE_IN, (UNET_PREFIX + "label_emb.0.0.weight", (8, 2560)),
                          (UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (8, 1280)),
                          ("conditioner.embedders.0.model.token_embedding.weight", (4, 8))),
    "SD-2.x": _keys(_UNET_IN, _VAE_IN,
                    (UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (8, 1024)),
                    ("cond_stage_model.model.token_embedding.weight", (4, 8))),
}  # Flux converts (below), and a cut Flux state is refused by the Flux checks


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_are_refused_by_name(tiny, family):
    tokenizer = _tokenizer(tiny["tokenizer_dir"], 77)
    with pytest.raises(ValueError) as err:  # with the shipped SD-1.5 configs, as the node uses them
        model_from_state_dict(OTHER_FAMILIES[family], tokenizer, dtype="fp32", device="cpu", source="comfyui")
    assert str(err.value) == f"'comfyui' is {family}, not SD-1.5: only SD-1.5 checkpoints are supported."


# --- the node's ComfyUI half, against a real ComfyUI --------------------------------------------------------

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "model_patcher.py")),
                    reason="set COMFYUI_PATH to a ComfyUI checkout to run the node against it")
def test_node_reads_comfyui_objects_with_patches_baked_in(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", f"import test_comfy_model_bridge as t; t.comfy_adapter_check({str(tmp_path)!r})"],
        cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "comfy adapter check passed" in result.stdout


def _comfy_sized_components(folder: str) -> dict:
    """Tiny components ComfyUI's own classes can hold: its CLIP has CLIP-L's 49408-token vocabulary and its
    VAE normalises in groups of 32. The pack's tiny UNet fits as it is."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    components = build_tiny_components(os.path.join(folder, "tokenizer"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        components["vae"] = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                          norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4).eval()
        components["text_encoder"] = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()
    return components


def comfy_adapter_check(folder: str) -> None:
    """Runs in its own process (see the test above): ComfyUI parses sys.argv and keeps global state."""
    _import_comfy()
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    from comfyui_video_edit.nodes.comfy_model import VE_FromComfyModel, comfy_checkpoint_state

    cpu = torch.device("cpu")
    components = _comfy_sized_components(folder)
    config_dir = _write_configs(os.path.join(folder, "configs"), components["unet"], components["vae"],
                                components["text_encoder"], components["scheduler_config"])
    original = _comfy_layout(to_ldm_checkpoint(components["unet"], components["vae"], components["text_encoder"]))

    # ComfyUI's objects built from that state, as its checkpoint loader builds them (its model detection
    # only matches full-size SD-1.5, so the SD15 model config is named here). Its loaders pop the keys they
    # take, so each gets copies.
    def part(prefix, strip=""):
        return {k[len(strip):]: v.clone() for k, v in original.items() if k.startswith(prefix)}

    unet_config = comfy.model_detection.detect_unet_config(original, UNET_PREFIX)
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model(original, UNET_PREFIX, device=cpu)
    base.load_model_weights(part(UNET_PREFIX), UNET_PREFIX)
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(config.clip_target(), model_options={"clip_l_model_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}})
    clip.load_sd(config.process_clip_state_dict(part(CLIP_PREFIX)), full_model=True)
    vae = comfy.sd.VAE(sd=part(VAE_PREFIX, strip=VAE_PREFIX),
                       config={"params": {"embed_dim": 4, "ddconfig": {
                           "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                           "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                           "dropout": 0.0}}})

    # Weight patches the way LoRA loaders and model merges add them (a "diff" per key, with a strength).
    unet_key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    diffusers_key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"  # the same layer
    clip_key = "text_model.encoder.layers.0.mlp.fc1.weight"
    g = torch.Generator().manual_seed(3)
    unet_delta = torch.randn(original[UNET_PREFIX + unet_key].shape, generator=g)
    clip_delta = torch.randn(original[CLIP_PREFIX + clip_key].shape, generator=g)
    patched_model, patched_clip = model.clone(), clip.clone()
    patched_model.add_patches({"diffusion_model." + unet_key: (unet_delta,)}, 0.5)
    patched_clip.add_patches({"clip_l.transformer." + clip_key: (clip_delta,)}, 0.25)

    with torch.inference_mode():  # as ComfyUI runs nodes
        state, tokenizer, tokenizer_2, source = comfy_checkpoint_state(patched_model, patched_clip, vae)
        assert tokenizer_2 is None  # SD-1.x has one text encoder
        expected = dict(original)
        expected[UNET_PREFIX + unet_key] = original[UNET_PREFIX + unet_key] + 0.5 * unet_delta
        expected[CLIP_PREFIX + clip_key] = original[CLIP_PREFIX + clip_key] + 0.25 * clip_delta
        ours = {k: v for k, v in state.items() if k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX))}
        assert ours.keys() == expected.keys(), sorted(set(ours) ^ set(expected))[:5]
        for key, value in expected.items():
            assert torch.equal(ours[key], value), key
        assert source == "comfyui:SD15+2 patched weights"
        assert tokenizer is clip.tokenizer.clip_l.tokenizer and tokenizer.model_max_length == 8192

        model_ = model_from_state_dict(state, tokenizer, dtype="fp32", device="cpu", source=source,
                                       config_dir=config_dir)
        assert torch.equal(model_.unet.state_dict()[diffusers_key], expected[UNET_PREFIX + unet_key])
        assert tokenizer.model_max_length == 8192 and model_.tokenizer.model_max_length == 77
        # ComfyUI's objects: patch lists as they were; the plain MODEL, loaded again, has its weights back.
        assert len(patched_model.patches) == 1 and not model.patches and len(patched_clip.patcher.patches) == 1
        comfy.model_management.load_models_gpu([model, clip.patcher])
        assert torch.equal(comfy.utils.get_attr(base, "diffusion_model." + unet_key), original[UNET_PREFIX + unet_key])
        assert torch.equal(model_.unet.state_dict()[diffusers_key], expected[UNET_PREFIX + unet_key])

        # The whole node, with its shipped SD-1.5 configs: the tiny model is refused by the engine, by width.
        try:
            VE_FromComfyModel().convert(patched_model, patched_clip, vae, "fp32", "cpu")
            raise AssertionError("the tiny model passed the SD-1.5 checks")
        except ValueError as err:
            assert "expects text features of width [32], not SD-1.5's 768" in str(err), err
        # Refusals by name in the node's ComfyUI half.
        skipped = clip.clone()
        skipped.clip_layer(-2)
        sampling = model.clone()
        sampling.add_object_patch("model_sampling", object())
        pix2pix = comfy.supported_models.SD15_instructpix2pix(unet_config)
        other = comfy.model_patcher.ModelPatcher(pix2pix.get_model({}, device=cpu), load_device=cpu, offload_device=cpu)
        for args, message in (((model, skipped, vae), "CLIP Set Last Layer (-2) is not supported"),
                              ((sampling, clip, vae), "carries object patch 'model_sampling'"),
                              ((other, clip, vae), "the MODEL is InstructPix2Pix, ComfyUI's 'SD15_instructpix2pix', "
                                                   "not SD-1.x, SDXL base or FLUX.1 dev/schnell")):
            try:
                comfy_checkpoint_state(*args)
                raise AssertionError(f"not refused: {message}")
            except ValueError as err:
                assert message in str(err), err
    print("comfy adapter check passed")


def _import_comfy():
    """ComfyUI as its main.py sets it up on the CPU, text encoders in fp32 (it keeps them in fp16 unless told)."""
    sys.argv = ["main.py", "--cpu", "--fp32-text-enc"]
    sys.path.insert(0, os.path.abspath(COMFYUI_PATH))
    import comfy.options

    comfy.options.enable_args_parsing()


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "model_patcher.py")),
                    reason="set COMFYUI_PATH to a ComfyUI checkout to run the node against it")
def test_node_reads_comfyui_sdxl_with_patches_baked_in(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", f"import test_comfy_model_bridge as t; t.comfy_sdxl_adapter_check({str(tmp_path)!r})"],
        cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "comfy sdxl adapter check passed" in result.stdout


# The tiny SDXL text encoders as ComfyUI's CLIP classes take them (model_options "<name>_model_config" override
# their json configs). Three layers, not the builtin's two: ComfyUI asserts the penultimate layer SDXL reads is
# an inner one (|layer_idx| < layers). CLIP-L's 49408-token vocabulary: ComfyUI's own tokenizer is used. bigG's
# projection as wide as its width (1280 both in SDXL): ComfyUI's CLIP builds text_projection square, whatever
# projection_dim says, so the builtin's narrower projection (24) cannot be held.
COMFY_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}
COMFY_CLIP_G = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                "projection_dim": 48}


def _comfy_sized_sdxl_components(folder: str) -> dict:
    """builtin:tiny-sdxl's shapes as ComfyUI's classes can hold and compute them: its UNet and VAE normalise in
    groups of 32 and its CLIPs have the sizes above (bigG's gelu for the second, CLIP-L's quick_gelu for the
    first). ComfyUI's own SDXL sampler still could not run this UNet: model_base.SDXL embeds the six size/crop ids
    with a fixed 256 features each (SDXL's label_emb reads 2816 = 1280 + 6 x 256), the tiny one reads 8 each."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    components = build_tiny_sdxl_components(os.path.join(folder, "tokenizer"))
    special = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                   pad_token_id=49407)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        unet_config = {k: v for k, v in components["unet"].config.items() if not k.startswith("_")}
        added = COMFY_CLIP_G["projection_dim"] + 6 * unet_config["addition_time_embed_dim"]  # pooled + size ids
        components["unet"] = UNet2DConditionModel.from_config(
            {**unet_config, "norm_num_groups": 32, "projection_class_embeddings_input_dim": added}).eval()
        components["vae"] = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                          norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025).eval()
        components["text_encoder"] = CLIPTextModel(CLIPTextConfig(**COMFY_CLIP_L, **special)).eval()
        components["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(**COMFY_CLIP_G, hidden_act="gelu", **special)).eval()
    return components


def comfy_sdxl_adapter_check(folder: str) -> None:
    """Runs in its own process (see the test above): ComfyUI's SDXL MODEL, CLIP and VAE, patched, through the node."""
    _import_comfy()
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    from comfyui_video_edit.nodes.comfy_model import VE_FromComfyModel, comfy_checkpoint_state

    cpu = torch.device("cpu")
    components = _comfy_sized_sdxl_components(folder)
    config_dir = _write_sdxl_configs(os.path.join(folder, "configs"), components)
    original = _comfy_sdxl_layout(to_sgm_checkpoint(*(components[name] for name in SDXL_PARTS)))

    # ComfyUI's objects built from that state as its checkpoint loader builds them (its model detection matches
    # only full-size SDXL, so the SDXL model config is named here). Its loaders pop the keys they take: copies.
    def part(prefix, strip=""):
        return {k[len(strip):]: v.clone() for k, v in original.items() if k.startswith(prefix)}

    unet_config = comfy.model_detection.detect_unet_config(original, UNET_PREFIX)
    config = comfy.supported_models.SDXL(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model(original, UNET_PREFIX, device=cpu)
    base.load_model_weights(part(UNET_PREFIX), UNET_PREFIX)
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(config.clip_target(), model_options={"clip_l_model_config": COMFY_CLIP_L,
                                                              "clip_g_model_config": COMFY_CLIP_G})
    missing, unexpected = clip.load_sd(config.process_clip_state_dict(part("conditioner.embedders.")), full_model=True)
    # As with a real SDXL file: CLIP-L's projection and logit scale are not in it (SDXL does not use them; ComfyUI's
    # save drops them again) and its position_ids are not in ComfyUI's CLIP.
    assert set(missing) <= {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}, missing
    assert set(unexpected) <= {"clip_l.transformer.text_model.embeddings.position_ids"}, unexpected
    assert clip.layer_idx is None  # the checkpoint loader's CLIP: SDXL's own penultimate layer for both
    vae = comfy.sd.VAE(sd=part(VAE_PREFIX, strip=VAE_PREFIX),
                       config={"params": {"embed_dim": 4, "ddconfig": {
                           "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                           "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                           "dropout": 0.0}}})

    # Weight patches as LoRA loaders and model merges add them: on the UNet and on clip_g (OpenCLIP bigG).
    unet_key = "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"
    diffusers_unet_key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"  # the same layer
    clip_g_key = "text_model.encoder.layers.0.mlp.fc1.weight"  # transformers' names in ComfyUI's CLIP...
    saved_clip_g_key = OPEN_CLIP_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight"  # ...OpenCLIP's when saved
    g = torch.Generator().manual_seed(3)
    unet_delta = torch.randn(original[UNET_PREFIX + unet_key].shape, generator=g)
    clip_delta = torch.randn(original[saved_clip_g_key].shape, generator=g)
    patched_model, patched_clip = model.clone(), clip.clone()
    patched_model.add_patches({"diffusion_model." + unet_key: (unet_delta,)}, 0.5)
    assert patched_clip.add_patches({"clip_g.transformer." + clip_g_key: (clip_delta,)}, 0.25)

    with torch.inference_mode():  # as ComfyUI runs nodes
        state, tokenizer, tokenizer_2, source = comfy_checkpoint_state(patched_model, patched_clip, vae)
        expected = dict(original)
        expected[UNET_PREFIX + unet_key] = original[UNET_PREFIX + unet_key] + 0.5 * unet_delta
        expected[saved_clip_g_key] = original[saved_clip_g_key] + 0.25 * clip_delta
        assert state.keys() == expected.keys(), sorted(set(state) ^ set(expected))[:8]
        for key, value in expected.items():
            if not key.endswith("logit_scale"):  # ComfyUI's CLIP keeps its own (unused by the text tower)
                assert torch.equal(state[key], value), key
        assert source == "comfyui:SDXL+2 patched weights"
        # Tokenizers: CLIP-L's is ComfyUI's object; the second is a copy padding with "!", the id ComfyUI's own
        # clip_g tokenizer pads with (ComfyUI's transformers tokenizer inside pads with the end token).
        assert tokenizer is patched_clip.tokenizer.clip_l.tokenizer
        comfy_g = patched_clip.tokenizer.clip_g
        assert tokenizer_2 is not comfy_g.tokenizer and comfy_g.tokenizer.pad_token == "<|endoftext|>"
        assert tokenizer_2.pad_token == "!" and tokenizer_2.pad_token_id == comfy_g.pad_token == 0

        model_ = model_from_state_dict(state, tokenizer, dtype="fp32", device="cpu", source=source,
                                       config_dir=config_dir, tokenizer_2=tokenizer_2)
        assert model_.backbone.name == "SDXL"
        reference = model_from_state_dict(expected, tokenizer, dtype="fp32", device="cpu", config_dir=config_dir,
                                          tokenizer_2=tokenizer_2)
        for name in SDXL_PARTS:
            _assert_same_module(getattr(model_, name), getattr(reference, name))
        assert torch.equal(model_.unet.state_dict()[diffusers_unet_key], expected[UNET_PREFIX + unet_key])
        assert torch.equal(model_.text_encoder_2.state_dict()[clip_g_key], expected[saved_clip_g_key])

        # The prompt as ComfyUI's patched SDXL CLIP encodes it (both penultimate layers side by side, the pooled
        # projection of bigG) is the prompt as the converted model encodes it: patch, layers and padding carried.
        prompt = "a red fox in the snow"
        cond, pooled = patched_clip.encode_from_tokens(patched_clip.tokenize(prompt), return_pooled=True)
        ours = encode_text(model_, prompt)
        assert cond.shape == ours.hidden.shape == (1, 77, 80), (cond.shape, ours.hidden.shape)
        assert torch.allclose(cond, ours.hidden, atol=1e-5), (cond - ours.hidden).abs().max()
        assert torch.allclose(pooled, ours.pooled, atol=1e-5), (pooled - ours.pooled).abs().max()
        unpatched = encode_text(model_from_state_dict(original, tokenizer, device="cpu", config_dir=config_dir,
                                                      tokenizer_2=tokenizer_2), prompt)
        assert not torch.allclose(unpatched.hidden[..., 32:], ours.hidden[..., 32:], atol=1e-3)  # clip_g's patch

        # The converted model samples.
        s = SamplerSettings(prompt, "blurry", seed=5, steps=2, cfg=6.0, scheduler="euler", attention="none")
        latents = edit_video(model_, s, frame_count=2, size=(64, 48))
        assert latents.shape == (2, 4, 8, 6) and torch.isfinite(latents).all(), latents.shape  # size is (H, W)

        # ComfyUI's objects: patch lists as they were; the plain MODEL, loaded again, has its weights back.
        assert len(patched_model.patches) == 1 and not model.patches and len(patched_clip.patcher.patches) == 1
        comfy.model_management.load_models_gpu([model, clip.patcher])
        assert torch.equal(comfy.utils.get_attr(base, "diffusion_model." + unet_key), original[UNET_PREFIX + unet_key])

        # The whole node, with its shipped SDXL base configs: the tiny model is refused by the engine, by width.
        try:
            VE_FromComfyModel().convert(patched_model, patched_clip, vae, "fp32", "cpu")
            raise AssertionError("the tiny model passed the SDXL base checks")
        except ValueError as err:
            assert "has a UNet reading text features of width [80], not SDXL base's 2048" in str(err), err

        # CLIP Set Last Layer -2 is SDXL's own reading (accepted, same prompt); -1 is not.
        penultimate = clip.clone()
        penultimate.clip_layer(-2)
        assert comfy_checkpoint_state(model, penultimate, vae)[3] == "comfyui:SDXL"
        last = clip.clone()
        last.clip_layer(-1)
        sd1_clip = comfy.sd.CLIP(comfy.supported_models.SD15({}).clip_target(),
                                 model_options={"clip_l_model_config": COMFY_CLIP_L})
        playground = comfy.model_patcher.ModelPatcher(
            comfy.supported_models.SDXL(unet_config).get_model({"edm_mean": torch.zeros(4), "edm_std": torch.ones(4)},
                                                                device=cpu),  # Playground v2.5
            load_device=cpu, offload_device=cpu)
        refiner = comfy.model_patcher.ModelPatcher(
            comfy.supported_models.SDXLRefiner(unet_config).get_model({}, device=cpu), load_device=cpu,
            offload_device=cpu)
        for args, message in (
                ((model, last, vae), "CLIP Set Last Layer (-1) is not supported: the video sampler reads the "
                                     "penultimate layer of both text encoders of SDXL base; remove that node (or set "
                                     "-2)"),
                ((model, sd1_clip, vae), "the CLIP is 'SD1ClipModel', not SDXL base's (SDXLClipModel)"),
                ((playground, clip, vae), "the MODEL is SDXL base with 'EDM' prediction"),
                ((refiner, clip, vae), "the MODEL is the SDXL refiner (it only finishes SDXL base's images), "
                                       "ComfyUI's 'SDXLRefiner', not SD-1.x, SDXL base or FLUX.1 dev/schnell")):
            try:
                comfy_checkpoint_state(*args)
                raise AssertionError(f"not refused: {message}")
            except ValueError as err:
                assert message in str(err), err
    print("comfy sdxl adapter check passed")


# --- Flux: the state dict ComfyUI's Flux gives builds builtin:tiny-flux ----------------------------------------

FLUX_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _comfy_flux_layout(components: dict, clip_logit_scale: float = 4.6052, t5_logit_scale: float = 4.6052) -> dict:
    """What ComfyUI's `state_dict_for_saving` gives for supported_models.Flux (read off a real ComfyUI, see
    `comfy_flux_adapter_check`): the transformer in BFL's layout under `model.diffusion_model.`, ae under `vae.`,
    CLIP-L (with its unused text projection, no position_ids) and T5 under `text_encoders.clip_l.transformer.` and
    `text_encoders.t5xxl.transformer.`, each text encoder with a `logit_scale` of ComfyUI's."""
    from flux_layout import clip_to_comfy, t5_to_comfy, transformer_to_bfl, vae_to_ae

    clip = {k: v for k, v in clip_to_comfy(components["text_encoder"]).items() if not k.endswith("position_ids")}
    state = transformer_to_bfl(components["unet"].transformer.state_dict(), prefix="model.diffusion_model.")
    state.update({"vae." + k: v for k, v in vae_to_ae(components["vae"].state_dict()).items()})
    state.update({"text_encoders.clip_l.transformer." + k: v for k, v in clip.items()})
    state.update({"text_encoders.t5xxl.transformer." + k: v
                  for k, v in t5_to_comfy(components["text_encoder_2"]).items()})
    state["text_encoders.clip_l.logit_scale"] = torch.tensor(clip_logit_scale)
    state["text_encoders.t5xxl.logit_scale"] = torch.tensor(t5_logit_scale)
    return state


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from comfyui_video_edit.pipelines_core.models.tiny import build_tiny_flux_components
    from flux_layout import write_configs

    root = tmp_path_factory.mktemp("bridge_flux")
    components = build_tiny_flux_components(str(root / "tokenizer"))
    return {"components": components, "config_dir": write_configs(str(root / "configs"), components),
            "tokenizer_dir": str(root / "tokenizer"), "comfy_state": _comfy_flux_layout(components)}


def _flux_latents(model, prompt: str = "a red fox in the snow") -> torch.Tensor:
    s = SamplerSettings(prompt, seed=5, steps=2, cfg=3.5, scheduler="flow_euler", attention="none")
    return edit_video(model, s, frame_count=2, size=(64, 48))


def test_flux_state_dict_gives_builtin_tiny_flux(tiny_flux, no_network):
    builtin = load_model("builtin:tiny-flux", dtype="fp32", device="cpu")
    state = tiny_flux["comfy_state"]
    snapshot = {k: v.clone() for k, v in state.items()}
    # The builtin's own tokenizers (its T5 reads the tiny byte vocabulary), CLIP's as ComfyUI's says: 8192.
    tokenizer = _tokenizer(tiny_flux["tokenizer_dir"], COMFY_TOKENIZER_LIMIT)

    model = model_from_state_dict(state, tokenizer, dtype="fp32", device="cpu", source="comfyui:Flux",
                                  config_dir=tiny_flux["config_dir"], tokenizer_2=builtin.tokenizer_2)

    assert model.backbone is builtin.backbone and model.kind == builtin.kind and model.source == "comfyui:Flux"
    for name in FLUX_PARTS:
        _assert_same_module(getattr(model, name), getattr(builtin, name))
        assert not getattr(model, name).training
    assert model.unet.config.guidance_embeds and model.scheduler_config == builtin.scheduler_config
    assert model.vae.config.shift_factor == builtin.vae.config.shift_factor
    assert tokenizer.model_max_length == COMFY_TOKENIZER_LIMIT and model.tokenizer.model_max_length == 77
    prompt, reference = encode_text(model, "a red fox"), encode_text(builtin, "a red fox")
    assert torch.equal(prompt.hidden, reference.hidden) and torch.equal(prompt.pooled, reference.pooled)
    ours = _flux_latents(model)
    assert torch.equal(ours, _flux_latents(builtin))
    assert not torch.equal(ours, _flux_latents(builtin, "a blue car"))  # the prompt reaches the output
    # The caller's tensors are left alone and not shared.
    assert all(torch.equal(state[k], snapshot[k]) for k in state)
    theirs = {v.untyped_storage().data_ptr() for v in state.values()}
    assert not any(p.untyped_storage().data_ptr() in theirs for name in FLUX_PARTS
                   for p in getattr(model, name).parameters())


def test_flux_schnell_state_dict_gets_schnell_and_a_patch_reaches_its_layer(tiny_flux):
    from flux_layout import SCHNELL_SCHEDULER

    builtin = load_model("builtin:tiny-flux", dtype="fp32", device="cpu")
    state = {k: v for k, v in tiny_flux["comfy_state"].items() if ".guidance_in." not in k}  # schnell: no guidance
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    delta = torch.randn(state[key].shape, generator=torch.Generator().manual_seed(1))
    state[key] = state[key] + delta  # what a baked-in LoRA patch leaves
    model = model_from_state_dict(state, builtin.tokenizer, dtype="bf16", device="cpu", source="comfyui:FluxSchnell",
                                  config_dir=tiny_flux["config_dir"], tokenizer_2=builtin.tokenizer_2)
    assert not model.unet.config.guidance_embeds and model.scheduler_config == SCHNELL_SCHEDULER
    assert model.dtype == torch.bfloat16 and model.text_encoder_2.dtype == torch.bfloat16
    weights = model.unet.transformer.state_dict()
    q, k, v = state[key].chunk(3)
    assert torch.equal(weights["transformer_blocks.0.attn.to_k.weight"], k.to(torch.bfloat16))
    assert not torch.equal(weights["transformer_blocks.0.attn.to_k.weight"],
                           builtin.unet.transformer.state_dict()["transformer_blocks.0.attn.to_k.weight"].bfloat16())


@pytest.mark.parametrize("change, message", [
    (lambda s: {k: v for k, v in s.items() if not k.startswith("text_encoders.t5xxl.")},
     r"^'comfyui:Flux' is Flux without T5-XXL \('text_encoders\.t5xxl\.transformer\.'\): a Flux model needs"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("model.diffusion_model.img_in.")},
     r"^'comfyui:Flux' is Flux without a whole FLUX\.1 transformer under 'model\.diffusion_model\.'"),
    (lambda s: {**s, "model.diffusion_model.img_in.weight": s["model.diffusion_model.img_in.weight"].to(
        torch.float8_e4m3fn)}, r"^'comfyui:Flux' holds float8_e4m3fn weights \('img_in\.weight'\)"),
    (lambda s: {**s, "vae.encoder.conv_in.weight": s["vae.encoder.conv_in.weight"].to(torch.float8_e5m2)},
     r"^'comfyui:Flux' holds float8_e5m2 weights \('encoder\.conv_in\.weight'\)"),
    (lambda s: {**s, "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.scale_weight":
                torch.tensor(1.0)},
     r"^'comfyui:Flux' holds quantisation scales \('encoder\.block\.0\..*scale_weight'\)"),
])
def test_flux_state_dicts_missing_parts_or_quantised_are_refused_in_one_line(tiny_flux, change, message):
    builtin = load_model("builtin:tiny-flux", dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match=message) as err:
        model_from_state_dict(change(tiny_flux["comfy_state"]), builtin.tokenizer, device="cpu", source="comfyui:Flux",
                              config_dir=tiny_flux["config_dir"], tokenizer_2=builtin.tokenizer_2)
    assert "\n" not in str(err.value)


def test_flux_fp8_t5_is_upcast_exactly_and_t5_tokenizer_is_required(tiny_flux):
    builtin = load_model("builtin:tiny-flux", dtype="fp32", device="cpu")
    prefix = "text_encoders.t5xxl.transformer."
    state = {k: v.to(torch.float8_e4m3fn) if k.startswith(prefix) and v.is_floating_point() else v
             for k, v in tiny_flux["comfy_state"].items()}  # what ComfyUI holds from t5xxl_fp8_e4m3fn.safetensors
    model = model_from_state_dict(state, builtin.tokenizer, device="cpu", config_dir=tiny_flux["config_dir"],
                                  tokenizer_2=builtin.tokenizer_2)
    t5 = model.text_encoder_2.state_dict()
    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert t5[name].dtype == torch.float32 and torch.equal(t5[name], state[prefix + name].float())
    with pytest.raises(ValueError, match=r"^'comfyui:Flux' is Flux: its T5 tokenizer \(tokenizer_2\) is needed too\.$"):
        model_from_state_dict(tiny_flux["comfy_state"], builtin.tokenizer, device="cpu", source="comfyui:Flux",
                              config_dir=tiny_flux["config_dir"])


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMFYUI_PATH, "comfy", "model_patcher.py")),
                    reason="set COMFYUI_PATH to a ComfyUI checkout to run the node against it")
def test_node_reads_comfyui_flux_with_patches_baked_in(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", f"import test_comfy_model_bridge as t; t.comfy_flux_adapter_check({str(tmp_path)!r})"],
        cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "comfy flux adapter check passed" in result.stdout


# The tiny Flux as ComfyUI's Flux classes hold it. The transformer is builtin:tiny-flux's (ComfyUI's Flux takes its
# sizes from the unet config given, below); CLIP-L has CLIP's 49408-token vocabulary and T5 T5-v1.1's 32128 tokens
# and gated GELU (ComfyUI's own tokenizers are used, and ComfyUI's T5 takes its config from t5_config_xxl.json with
# these sizes put over it). The VAE is full-size: ComfyUI builds an ae from fixed sizes (128 channels, x1/2/4/4,
# two blocks per level: FLUX.1's) whatever the weights say.
COMFY_FLUX_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
COMFY_FLUX_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4}
COMFY_FLUX_UNET = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 32,
                   "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
                   "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "qkv_bias": True,
                   "guidance_embed": True}


def _comfy_sized_flux_components(folder: str) -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from comfyui_video_edit.pipelines_core.models.flux_single_file import FluxConfigs
    from comfyui_video_edit.pipelines_core.models.tiny import build_tiny_flux_components

    components = build_tiny_flux_components(os.path.join(folder, "tokenizer"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        components["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(FluxConfigs().vae)).eval()
        components["text_encoder"] = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            **COMFY_FLUX_CLIP_L)).eval()
        components["text_encoder_2"] = T5EncoderModel(T5Config(
            vocab_size=32128, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
            **COMFY_FLUX_T5)).eval()
    return components


def comfy_flux_adapter_check(folder: str) -> None:
    """Runs in its own process: ComfyUI's Flux MODEL (Load Diffusion Model's), DualCLIPLoader's CLIP and the ae,
    patched, through the node."""
    _import_comfy()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.text_encoders.flux
    import comfy.utils

    from comfyui_video_edit.nodes.comfy_model import VE_FromComfyModel, comfy_checkpoint_state
    from flux_layout import write_configs

    cpu = torch.device("cpu")
    components = _comfy_sized_flux_components(folder)
    config_dir = write_configs(os.path.join(folder, "configs"), components)
    original = _comfy_flux_layout(components, clip_logit_scale=0.0, t5_logit_scale=0.0)

    def part(prefix, strip=""):
        return {k[len(strip):]: v.clone() for k, v in original.items() if k.startswith(prefix)}

    # As Load Diffusion Model, DualCLIPLoader (type flux) and Load VAE build them; ComfyUI's detection only knows
    # FLUX.1's sizes, so the Flux config is named with the tiny sizes.
    config = comfy.supported_models.Flux(COMFY_FLUX_UNET)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=cpu)
    base.load_model_weights(part(UNET_PREFIX), UNET_PREFIX)
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(config.clip_target(), model_options={"clip_l_model_config": COMFY_FLUX_CLIP_L,
                                                              "t5xxl_model_config": COMFY_FLUX_T5})
    for name in ("clip_l", "t5xxl"):  # one file each, as DualCLIPLoader loads them
        missing, unexpected = clip.load_sd(part(f"text_encoders.{name}.transformer.",
                                                strip=f"text_encoders.{name}.transformer."))
        assert not unexpected, unexpected
    vae = comfy.sd.VAE(sd=part("vae.", strip="vae."))
    assert type(vae.first_stage_model).__name__ == "AutoencodingEngine" and vae.latent_channels == 16

    # Weight patches as LoRA loaders add them: on a double block's fused q/k/v, on T5 and on CLIP-L.
    unet_key = "double_blocks.0.img_attn.qkv.weight"
    t5_key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    clip_key = "text_model.encoder.layers.0.mlp.fc1.weight"
    g = torch.Generator().manual_seed(3)
    unet_delta = torch.randn(original[UNET_PREFIX + unet_key].shape, generator=g)
    t5_delta = torch.randn(original["text_encoders.t5xxl.transformer." + t5_key].shape, generator=g)
    clip_delta = torch.randn(original["text_encoders.clip_l.transformer." + clip_key].shape, generator=g)
    patched_model, patched_clip = model.clone(), clip.clone()
    patched_model.add_patches({"diffusion_model." + unet_key: (unet_delta,)}, 0.5)
    assert patched_clip.add_patches({"t5xxl.transformer." + t5_key: (t5_delta,),
                                     "clip_l.transformer." + clip_key: (clip_delta,)}, 0.25)

    with torch.inference_mode():  # as ComfyUI runs nodes
        state, tokenizer, tokenizer_2, source = comfy_checkpoint_state(patched_model, patched_clip, vae)
        expected = dict(original)
        expected[UNET_PREFIX + unet_key] = original[UNET_PREFIX + unet_key] + 0.5 * unet_delta
        expected["text_encoders.t5xxl.transformer." + t5_key] = (
            original["text_encoders.t5xxl.transformer." + t5_key] + 0.25 * t5_delta)
        expected["text_encoders.clip_l.transformer." + clip_key] = (
            original["text_encoders.clip_l.transformer." + clip_key] + 0.25 * clip_delta)
        assert state.keys() == expected.keys(), sorted(set(state) ^ set(expected))[:8]
        for key, value in expected.items():
            if not key.endswith(("logit_scale", "text_projection.weight")):  # ComfyUI's own, unused by Flux
                assert torch.equal(state[key], value), key
        assert source == "comfyui:Flux+3 patched weights"
        assert tokenizer is patched_clip.tokenizer.clip_l.tokenizer
        assert tokenizer_2 is patched_clip.tokenizer.t5xxl.tokenizer and tokenizer_2.model_max_length == 512

        model_ = model_from_state_dict(state, tokenizer, dtype="fp32", device="cpu", source=source,
                                       config_dir=config_dir, tokenizer_2=tokenizer_2)
        assert model_.backbone.name == "Flux" and model_.unet.config.guidance_embeds
        reference = model_from_state_dict(expected, tokenizer, dtype="fp32", device="cpu", config_dir=config_dir,
                                          tokenizer_2=tokenizer_2)
        for name in FLUX_PARTS:
            _assert_same_module(getattr(model_, name), getattr(reference, name))
        q, _k, _v = expected[UNET_PREFIX + unet_key].chunk(3)
        assert torch.equal(model_.unet.transformer.state_dict()["transformer_blocks.0.attn.to_q.weight"], q)
        assert torch.equal(model_.text_encoder_2.state_dict()[t5_key], expected["text_encoders.t5xxl.transformer." +
                                                                                 t5_key])

        # The prompt as ComfyUI's patched Flux CLIP encodes it is the prompt as the converted model encodes it
        # (CLIP-L's pooled output; T5's hidden states, with ComfyUI's T5 tokens padded to FluxPipeline's 512 where
        # ComfyUI pads to 256: T5 attends to its padding, so the length matters).
        prompt = "a red fox in the snow"
        t5_tokens = comfy.text_encoders.flux.T5XXLTokenizer()
        t5_tokens.min_length = 512
        tokens = {"l": patched_clip.tokenizer.clip_l.tokenize_with_weights(prompt),
                  "t5xxl": t5_tokens.tokenize_with_weights(prompt)}
        cond, pooled = patched_clip.encode_from_tokens(tokens, return_pooled=True)
        ours = encode_text(model_, prompt)
        assert cond.shape == ours.hidden.shape == (1, 512, 32), (cond.shape, ours.hidden.shape)
        # ComfyUI's T5 is its own implementation (its attention kernel, tanh GELU): it agrees to float rounding
        # (measured 1.6e-5 at most), far below what the patch changes.
        assert torch.allclose(cond, ours.hidden, atol=1e-4), (cond - ours.hidden).abs().max()
        assert torch.allclose(pooled, ours.pooled, atol=1e-5), (pooled - ours.pooled).abs().max()
        unpatched = encode_text(model_from_state_dict(original, tokenizer, device="cpu", config_dir=config_dir,
                                                      tokenizer_2=tokenizer_2), prompt)
        assert not torch.allclose(unpatched.hidden, ours.hidden, atol=1e-2)  # T5's patch
        assert not torch.allclose(unpatched.pooled, ours.pooled, atol=1e-3)  # CLIP-L's

        # The converted model samples.
        latents = _flux_latents(model_, prompt)
        assert latents.shape == (2, 16, 8, 6) and torch.isfinite(latents).all(), latents.shape

        # ComfyUI's objects: patch lists as they were; the plain MODEL, loaded again, has its weights back.
        assert len(patched_model.patches) == 1 and not model.patches and len(patched_clip.patcher.patches) == 2
        comfy.model_management.load_models_gpu([model, clip.patcher])
        assert torch.equal(comfy.utils.get_attr(base, "diffusion_model." + unet_key), original[UNET_PREFIX + unet_key])

        # The whole node, with its shipped FLUX.1 configs: the tiny model is refused by the engine, by width.
        try:
            VE_FromComfyModel().convert(patched_model, patched_clip, vae, "fp32", "cpu")
            raise AssertionError("the tiny model passed the FLUX.1 checks")
        except ValueError as err:
            assert "reads 16 input channels" in str(err) or "is 32 wide, not 3072" in str(err), err

        # schnell: its own class (FLOW prediction, no guidance embedding), converted with schnell's scheduler.
        schnell_config = comfy.supported_models.FluxSchnell({**COMFY_FLUX_UNET, "guidance_embed": False})
        schnell_config.set_inference_dtype(torch.float32, None)
        schnell_base = schnell_config.get_model({}, device=cpu)
        schnell_base.load_model_weights({k: v for k, v in part(UNET_PREFIX).items() if ".guidance_in." not in k},
                                        UNET_PREFIX)
        schnell = comfy.model_patcher.ModelPatcher(schnell_base, load_device=cpu, offload_device=cpu)
        state, _t, _t2, source = comfy_checkpoint_state(schnell, clip, vae)
        assert source == "comfyui:FluxSchnell" and not any(".guidance_in." in k for k in state)
        schnell_model = model_from_state_dict(state, tokenizer, device="cpu", config_dir=config_dir,
                                              tokenizer_2=tokenizer_2)
        assert not schnell_model.unet.config.guidance_embeds and schnell_model.scheduler_config["shift"] == 1.0

        # Refusals by name, before anything is loaded: fp8 weights (Load Diffusion Model's weight_dtype fp8_e4m3fn),
        # a clip skip, an SD CLIP or an SD VAE with Flux, Flux's CLIP with an SD-1.5 MODEL.
        fp8_config = comfy.supported_models.Flux(COMFY_FLUX_UNET)
        fp8_config.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
        fp8 = comfy.model_patcher.ModelPatcher(fp8_config.get_model({}, device=cpu), load_device=cpu,
                                               offload_device=cpu)
        skipped = clip.clone()
        skipped.clip_layer(-2)
        sd1_clip = comfy.sd.CLIP(comfy.supported_models.SD15({}).clip_target(),
                                 model_options={"clip_l_model_config": COMFY_FLUX_CLIP_L})
        sd_vae = comfy.sd.VAE(sd=_sd_vae_state(), config={"params": {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}})
        for args, message in (
                ((fp8, clip, vae), "the MODEL holds float8_e4m3fn (fp8-quantised) weights"),
                ((model, skipped, vae), "CLIP Set Last Layer (-2) is not supported: the video sampler reads the last "
                                        "layers of CLIP-L and T5-XXL of FLUX.1 dev"),
                ((model, sd1_clip, vae), "the CLIP is 'SD1ClipModel', not FLUX.1 dev's (FluxClipModel_)"),
                ((model, clip, sd_vae), "the VAE is 'AutoencoderKL' with 4 latent channels, not FLUX.1 dev's KL "
                                        "autoencoder with 16: connect the FLUX.1 dev ae")):
            try:
                comfy_checkpoint_state(*args)
                raise AssertionError(f"not refused: {message}")
            except ValueError as err:
                assert message in str(err), err
    print("comfy flux adapter check passed")


def _sd_vae_state() -> dict:
    """An SD VAE's keys and shapes in ComfyUI's names (the LDM layout without prefix), for the wrong-VAE refusal."""
    from diffusers import AutoencoderKL

    from ldm_layout import vae_to_ldm

    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return {k[len(VAE_PREFIX):]: v for k, v in vae_to_ldm(vae.state_dict()).items()}
