"""LoRA Apply on SDXL: one file changes the UNet and BOTH text encoders, read in diffusers' layout and in kohya's
(diffusers-named and sgm-named UNet blocks), and our sampler with it equals diffusers' StableDiffusionXLPipeline
after `load_lora_weights` of the diffusers-layout file (for the kohya files: of the same numbers, see the equality
test); the scope hands all three modules back bit for bit; a LoRA of the other family is refused by name.

The LoRA is made with peft on a scratch builtin:tiny-sdxl (random A and B, α ≠ r so the scale shows) and saved with
diffusers' `StableDiffusionXLPipeline.save_lora_weights`. The kohya files are made from the same numbers: keys by
diffusers' `convert_state_dict_to_kohya` (the layout diffusers' SDXL training scripts export for A1111/ComfyUI),
with each layer's `.alpha` set to the LoRA's α; and the sgm-named file (what kohya's sd-scripts write for SDXL:
`lora_unet_input_blocks_3_1_…`) renames those UNet blocks by hand, from SDXL's block numbering.
"""

from __future__ import annotations

import hashlib
import os
import re

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers

from comfyui_video_edit.pipelines_core.models.lora import add_lora, check_lora, lora_scope
from comfyui_video_edit.pipelines_core.models.model import decode_latents, encode_text, load_model
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.schedulers import make_scheduler
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
from test_lora import TE_TARGETS, UNET_TARGETS, kohya_state, lora_table, write

PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
PARTS = ("unet", "text_encoder", "text_encoder_2")
# rank, alpha and the layers each part's LoRA changes (peft matches target names at the end of module paths)
CONFIGS = {
    "unet": dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"]),
    "text_encoder": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "out_proj", "fc1"]),
    "text_encoder_2": dict(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj", "fc2"]),
}


def sdxl_lora_layers(seed: int = 5) -> dict:
    """{part: LoRA layers in peft's names ("….lora_A.weight": …)} made with peft on a scratch tiny SDXL."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    scratch = load_model("builtin:tiny-sdxl", dtype="fp32", device="cpu")
    layers = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for part in PARTS:
            module = getattr(scratch, part)
            module.add_adapter(LoraConfig(init_lora_weights=False, **CONFIGS[part]))  # random B: not a no-op
            state = get_peft_model_state_dict(module)
            layers[part] = {k: v * 0.5 for k, v in state.items()}
    return layers


def save_diffusers(folder: str, layers: dict, name: str = "xl_diffusers.safetensors") -> str:
    meta = CONFIGS  # the LoraConfig fields diffusers' training scripts write (`LoraConfig.to_dict()`)
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], weight_name=name,
        unet_lora_adapter_metadata=meta["unet"], text_encoder_lora_adapter_metadata=meta["text_encoder"],
        text_encoder_2_lora_adapter_metadata=meta["text_encoder_2"])
    return os.path.join(folder, name)


def kohya_layers(layers: dict) -> dict:
    """The same numbers in kohya's layout, keys by diffusers' converter, α per layer as the LoRA's."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    state = {}
    for part in PARTS:
        kohya = convert_state_dict_to_kohya({f"{part}.{k}": v for k, v in layers[part].items()})
        state.update({k: (torch.tensor(float(CONFIGS[part]["lora_alpha"])) if k.endswith(".alpha") else v)
                      for k, v in kohya.items()})
    return state


def sgm_names(state: dict, layers_per_block: int) -> dict:
    """kohya's SDXL UNet names: its sgm blocks (input_blocks.i.1 = the attention of down level b, layer j with
    i = 1 + b·(n+1) + j; middle_block.1; output_blocks.(b·(n+1) + j).1), n = layers per block."""
    n = layers_per_block + 1

    def rename(key: str) -> str:
        key = re.sub(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_",
                     lambda m: f"lora_unet_input_blocks_{1 + int(m[1]) * n + int(m[2])}_1_", key)
        key = key.replace("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_")
        return re.sub(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_",
                      lambda m: f"lora_unet_output_blocks_{int(m[1]) * n + int(m[2])}_1_", key)

    renamed = {rename(k): v for k, v in state.items()}
    assert any("input_blocks" in k for k in renamed) and any("output_blocks" in k for k in renamed)
    return renamed


@pytest.fixture(scope="module")
def sdxl():
    return load_model("builtin:tiny-sdxl", dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def files(sdxl, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("xl_loras"))
    layers = sdxl_lora_layers()
    kohya = kohya_layers(layers)
    return {
        "diffusers": save_diffusers(folder, layers),
        "kohya": write(folder, "xl_kohya.safetensors", kohya),
        "kohya_sgm": write(folder, "xl_kohya_sgm.safetensors", sgm_names(kohya, sdxl.unet.config.layers_per_block)),
        # diffusers' training scripts' names (`convert_state_dict_to_diffusers`: `to_q.lora.down`,
        # `q_proj.lora_linear_layer.down`, but `proj_in.lora_A`): a mix diffusers' own loader reads only in part
        "diffusers_old": save_diffusers(folder, {p: convert_state_dict_to_diffusers(v) for p, v in layers.items()},
                                        "xl_diffusers_old.safetensors"),
    }


def reference_pipeline(path: str) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline on its own copy of tiny-sdxl (the same seeded weights), the file loaded by diffusers."""
    ref = load_model("builtin:tiny-sdxl", dtype="fp32", device="cpu")
    pipe = StableDiffusionXLPipeline(vae=ref.vae, text_encoder=ref.text_encoder, text_encoder_2=ref.text_encoder_2,
                                     tokenizer=ref.tokenizer, tokenizer_2=ref.tokenizer_2, unet=ref.unet,
                                     scheduler=make_scheduler("euler", ref.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(path)
    return pipe


def digests(model) -> dict:
    return {part: {name: (tuple(t.shape), hashlib.sha1(t.detach().contiguous().numpy().tobytes()).hexdigest())
                   for name, t in getattr(model, part).state_dict().items()} for part in PARTS}


# --- the sampler with the LoRA equals diffusers' SDXL pipeline with it --------------------------------------

@pytest.mark.parametrize("layout, strength", [("diffusers", 1.0), ("kohya", 0.7), ("kohya_sgm", 1.0)])
def test_sdxl_lora_sampling_equals_diffusers_sdxl_pipeline_with_load_lora_weights(sdxl, files, layout, strength):
    """Frame f of our sampler (attention "none") with the LoRA at `strength` is diffusers' SDXL pipeline with the
    LoRA loaded by `load_lora_weights` at the same scale, seed + f. The reference loads the diffusers-layout file
    of the same numbers for every layout: diffusers 0.42.1 with transformers 5 loads a kohya file's UNet and
    text_encoder layers but drops its text_encoder_2 self-attention layers (q/k_proj; peft reports them
    UNEXPECTED), so its load of the kohya file is not a reference for the second encoder."""
    before = digests(sdxl)
    model = add_lora(sdxl, files[layout], strength)
    assert model.loras[0].parts == PARTS  # one file, three modules
    s = SamplerSettings(PROMPT, NEGATIVE, seed=3, steps=3, cfg=6.0, scheduler="euler", attention="none")
    plain = decode_latents(sdxl, edit_video(sdxl, s, frame_count=2, size=(64, 48)))
    ours = decode_latents(sdxl, edit_video(model, s, frame_count=2, size=(64, 48)))
    assert (ours - plain).abs().max() > 1e-3  # the LoRA does something ...
    assert digests(sdxl) == before  # ... and the scope hands the modules back bit for bit
    pipe = reference_pipeline(files["diffusers"])  # the same numbers (see the docstring for the kohya files)
    for f in range(2):
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=48, num_inference_steps=3, guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(3 + f), output_type="pt",
                   cross_attention_kwargs={"scale": strength}).images  # diffusers' LoRA scale: UNet and both encoders
        assert (ref[0].permute(1, 2, 0) - ours[f]).abs().max() <= 1e-4


def test_diffusers_training_script_names_load_every_layer_like_peft_names(sdxl, files):
    """A file in the names diffusers' SDXL training scripts save (old and peft names mixed) loads every layer: it
    computes what the peft-named file computes. (diffusers' `load_lora_weights` drops the old-named UNet layers of
    such a file, so it cannot be the reference here.)"""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = encode_text(sdxl, PROMPT)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])  # SDXL's size/crop ids for a 64x64 run
    added = {"added_cond_kwargs": {"text_embeds": text.pooled.expand(2, -1), "time_ids": ids.expand(2, -1)}}
    out = {}
    for layout in ("diffusers", "diffusers_old"):
        model = add_lora(sdxl, files[layout], 1.0)
        with lora_scope(model), torch.no_grad():
            counts = {part: sum("lora_A" in k for k in getattr(sdxl, part).state_dict()) for part in PARTS}
            embeds = encode_text(model, PROMPT)
            out[layout] = (counts, embeds.hidden, embeds.pooled,
                           sdxl.unet(x, 500, encoder_hidden_states=text.hidden.expand(2, -1, -1), **added).sample)
    assert out["diffusers"][0] == out["diffusers_old"][0]
    for a, b in zip(out["diffusers"][1:], out["diffusers_old"][1:]):
        assert torch.equal(a, b)


def test_each_text_encoder_is_changed_by_its_own_part(sdxl, files):
    """The file's text_encoder and text_encoder_2 layers each reach the prompt encoding (hidden states of both
    encoders side by side; the pooled embedding is the second's alone)."""
    width = sdxl.text_encoder.config.hidden_size
    base = encode_text(sdxl, PROMPT)
    model = add_lora(sdxl, files["kohya_sgm"], 1.0)
    with lora_scope(model):
        styled = encode_text(model, PROMPT)
    assert (styled.hidden[..., :width] - base.hidden[..., :width]).abs().max() > 1e-3  # text_encoder
    assert (styled.hidden[..., width:] - base.hidden[..., width:]).abs().max() > 1e-3  # text_encoder_2
    assert (styled.pooled - base.pooled).abs().max() > 1e-3  # text_encoder_2's projection (text_projection)
    assert torch.equal(encode_text(sdxl, PROMPT).hidden, base.hidden)


def test_scope_hands_all_three_modules_back_plain_and_bit_identical(sdxl, files):
    before = digests(sdxl)
    model = add_lora(add_lora(sdxl, files["diffusers"], 0.6), files["kohya"], 0.3)
    with lora_scope(model):
        for part in PARTS:
            assert any("lora_A" in k for k in getattr(sdxl, part).state_dict()), part
        with lora_scope(sdxl):  # a base branch inside a LoRA branch computes the base
            assert torch.equal(encode_text(sdxl, PROMPT).pooled, encode_text(sdxl, PROMPT).pooled)
    assert digests(sdxl) == before
    for part in PARTS:
        module = getattr(sdxl, part)
        assert not hasattr(module, "peft_config") and not getattr(module, "_hf_peft_config_loaded", False), part
        assert not any("lora" in name for name, _ in module.named_modules()), part


# --- the other family's LoRA is refused, naming the file and the family --------------------------------------

def one_line_error(call, *words):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_an_sd15_lora_on_sdxl_is_refused(sdxl, tmp_path):
    sd = load_model("builtin:tiny", dtype="fp32", device="cpu")
    state = kohya_state(lora_table(sd.unet, UNET_TARGETS, seed=1), lora_table(sd.text_encoder, TE_TARGETS, seed=2))
    path = write(str(tmp_path), "sd15_style.safetensors", state)
    check_lora(sd, path)  # a good SD-1.5 LoRA ...
    one_line_error(lambda: add_lora(sdxl, path), "sd15_style.safetensors", "does not fit this model (SDXL)",
                   "use an SDXL LoRA")  # ... is not one for SDXL
    assert not hasattr(sdxl.unet, "peft_config")


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "kohya_sgm"])
def test_an_sdxl_lora_on_sd15_is_refused(files, layout):
    sd = load_model("builtin:tiny", dtype="fp32", device="cpu")
    name = os.path.basename(files[layout])
    one_line_error(lambda: add_lora(sd, files[layout]), name, "not a LoRA for SD-1.5", "text_encoder_2")


def test_an_sdxl_unet_lora_on_sd15_is_refused(files):
    """Without text_encoder_2 layers to give it away, the UNet layers do not fit SD-1.5's UNet."""
    sd = load_model("builtin:tiny", dtype="fp32", device="cpu")
    unet_only = {k: v for k, v in kohya_layers(sdxl_lora_layers()).items() if k.startswith("lora_unet_")}
    path = write(os.path.dirname(files["kohya"]), "xl_unet_only.safetensors", unet_only)
    one_line_error(lambda: add_lora(sd, path), "xl_unet_only.safetensors", "does not fit this model (SD-1.5)",
                   "use an SD-1.5 LoRA")
