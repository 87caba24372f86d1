"""`builtin:tiny`: a small random model with Stable Diffusion's shape, built in-process.

It lets the demo and the tests run anywhere, offline, in seconds. Its weights are random, so its
output is not a meaningful edit: it only proves that the graph runs end to end. Point Load Model at a
real SD-1.5 checkpoint for real edits.

Shape: a 2-level UNet with cross-attention at both levels (so every attention mechanism has
encoder and decoder layers to act on), an 8x VAE (4 levels, like SD's), a 2-layer CLIP text encoder,
and a byte-level tokenizer whose vocabulary is written on the fly (no download).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import torch

SD_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

TINY_SEED = 20240601
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2/CLIP convention)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    chars = {}
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_tokenizer(folder: str) -> str:
    """Write a CLIP tokenizer (vocab.json + merges.txt) with one token per byte, and return the folder."""
    os.makedirs(folder, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [_BOS, _EOS]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": _BOS,
                   "eos_token": _EOS, "pad_token": _EOS, "unk_token": _EOS}, f)
    return folder


def _tiny_unet(in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )


def _tiny_text_encoder(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(config)


def build_tiny_components(tokenizer_folder: str, seed: int = TINY_SEED, unet_in_channels: int = 4) -> dict:
    """Fresh tiny components: unet, vae, text_encoder, tokenizer, scheduler_config (fp32, CPU, eval).
    `unet_in_channels` 8: an InstructPix2Pix-shaped UNet (noisy latent + source-image latent on channels)."""
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(tokenizer_folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(unet_in_channels)
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder(
            len(tokenizer), tokenizer.convert_tokens_to_ids(_BOS), tokenizer.convert_tokens_to_ids(_EOS)
        )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler_config": dict(SD_SCHEDULER_CONFIG),
    }


@lru_cache(maxsize=1)
def _tokenizer_home() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="ve_tiny_tokenizer_")


def _tiny_sdxl_unet():
    """SDXL's UNet shape in small: no attention at the first level, linear projections, more transformer layers
    deeper down, the pooled text embedding and six size/crop ids added to the timestep embedding."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=SDXL_POOLED + 6 * 8,
        cross_attention_dim=32 + SDXL_SECOND_WIDTH,  # both text encoders' hidden states side by side
        norm_num_groups=8,
    )


SDXL_SECOND_WIDTH = 48  # the tiny second text encoder's width (bigG's 1280 in SDXL)
SDXL_POOLED = 24  # its projection (1280 in SDXL)
SDXL_SCHEDULER_CONFIG = {**SD_SCHEDULER_CONFIG, "_class_name": "EulerDiscreteScheduler",
                         "timestep_spacing": "leading"}


def build_tiny_sdxl_components(tokenizer_folder: str, seed: int = TINY_SEED) -> dict:
    """Fresh tiny SDXL components: the SD ones' VAE (SDXL's scaling factor), two CLIP text encoders (the second
    with a projection, as OpenCLIP bigG in SDXL) sharing the tiny tokenizer, an SDXL-shaped UNet."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    write_tiny_tokenizer(tokenizer_folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    bos, eos = tokenizer.convert_tokens_to_ids(_BOS), tokenizer.convert_tokens_to_ids(_EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        unet = _tiny_sdxl_unet()
        vae = _tiny_vae()
        vae.register_to_config(scaling_factor=0.13025)
        text_encoder = _tiny_text_encoder(len(tokenizer), bos, eos)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=SDXL_SECOND_WIDTH, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
            projection_dim=SDXL_POOLED))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": CLIPTokenizer.from_pretrained(tokenizer_folder, pad_token="!"),  # as SDXL's
            "scheduler_config": dict(SDXL_SCHEDULER_CONFIG)}


def tiny_sdxl_components() -> dict:
    """The `builtin:tiny-sdxl` components, built fresh: SDXL's layout with random weights, for tests and demos."""
    return build_tiny_sdxl_components(_tokenizer_home())


FLUX_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                         "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                         "base_image_seq_len": 256, "max_image_seq_len": 4096}  # Flux-dev's


def build_tiny_flux_components(tokenizer_folder: str, seed: int = TINY_SEED) -> dict:
    """Fresh tiny Flux components: an MMDiT with one double- and one single-stream block on 2x2-packed 16-channel
    latents, guidance embedding (as Flux-dev), a 16-channel VAE with Flux's scale and shift, CLIP (pooled) and a
    small T5 encoder, both reading the tiny byte tokenizer (Flux's T5 tokenizer is a SentencePiece one; the
    encoder only sees ids)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    from .flux import FluxNetwork

    write_tiny_tokenizer(tokenizer_folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    bos, eos = tokenizer.convert_tokens_to_ids(_BOS), tokenizer.convert_tokens_to_ids(_EOS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 11)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        vae = _tiny_flux_vae()
        text_encoder = _tiny_text_encoder(len(tokenizer), bos, eos)
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64,
                                                 num_layers=2, num_heads=4, pad_token_id=eos, eos_token_id=eos))
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return {"unet": FluxNetwork(transformer), "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": CLIPTokenizer.from_pretrained(tokenizer_folder),
            "scheduler_config": dict(FLUX_SCHEDULER_CONFIG)}


def _tiny_flux_vae():
    """The tiny VAE's shape with Flux's 16 latent channels, scaling factor and shift."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=64,
                         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def tiny_flux_components() -> dict:
    """The `builtin:tiny-flux` components, built fresh: Flux's layout with random weights, for tests and demos."""
    return build_tiny_flux_components(_tokenizer_home())


def tiny_components() -> dict:
    """The `builtin:tiny` components, built fresh (callers may move or cast them freely)."""
    return build_tiny_components(_tokenizer_home())


def tiny_ip2p_components() -> dict:
    """The `builtin:tiny-ip2p` components: `builtin:tiny`'s construction with an 8-channel UNet, the layout of
    InstructPix2Pix (random weights: it runs instruction graphs anywhere, meaning nothing)."""
    return build_tiny_components(_tokenizer_home(), unet_in_channels=8)


def save_tiny_pipeline(folder: str, instruct: bool = False) -> str:
    """Save the tiny model as a diffusers folder (model_index.json + subfolders); used by tests and docs.
    `instruct`: the tiny InstructPix2Pix model, saved as diffusers' StableDiffusionInstructPix2PixPipeline."""
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    c = tiny_ip2p_components() if instruct else tiny_components()
    pipeline_class = StableDiffusionInstructPix2PixPipeline if instruct else StableDiffusionPipeline
    pipe = pipeline_class(
        unet=c["unet"],
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        scheduler=DDIMScheduler.from_config(c["scheduler_config"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_controlnet(unet, seed: int = TINY_SEED):
    """A ControlNet shaped for the tiny UNet, with random non-zero weights (diffusers zero-initialises its
    output convolutions, which would make it a no-op): lets ControlNet graphs run anywhere, meaning nothing."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
        zero_convs = list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block,
                                                                 controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.05)
            torch.nn.init.normal_(conv.bias, std=0.01)
    latent = 4
    if controlnet.config.in_channels != latent:
        # An instruction UNet's (8 channels): a ControlNet reads the noisy latent alone, as SD-1.5's ControlNets
        # do beside InstructPix2Pix, so it keeps the conv_in weights of those channels.
        wide = controlnet.conv_in
        controlnet.conv_in = torch.nn.Conv2d(latent, wide.out_channels, wide.kernel_size, padding=wide.padding)
        controlnet.conv_in.weight.data.copy_(wide.weight.data[:, :latent])
        controlnet.conv_in.bias.data.copy_(wide.bias.data)
        controlnet.register_to_config(in_channels=latent)
    return controlnet.eval().requires_grad_(False)


def tiny_sdxl_controlnet(unet, seed: int = TINY_SEED):
    """A ControlNet shaped for the tiny SDXL UNet (`builtin:tiny-sdxl`), random non-zero output convolutions as
    `tiny_controlnet`'s. `ControlNetModel.from_unet` copies the UNet's added text/time embedding, so the ControlNet
    reads SDXL's pooled text embedding and size/crop ids as its UNet does (an SDXL ControlNet's layout)."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise ValueError("tiny_sdxl_controlnet needs an SDXL UNet (text_time added conditioning); "
                         "use tiny_controlnet for SD-1.5-shaped UNets")
    return tiny_controlnet(unet, seed)


def sd15_random_components(seed: int = TINY_SEED) -> dict:
    """SD-1.5-sized components (the shipped SD-1.5 configs) with random weights and the tiny tokenizer:
    for benchmarking memory and speed at real size without any weights file. Not a meaningful model."""
    import os

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    configs = _configs("sd15")
    write_tiny_tokenizer(_tokenizer_home())
    tokenizer = CLIPTokenizer.from_pretrained(_tokenizer_home())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(configs, "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(configs, "vae")))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(configs, "text_encoder")))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler_config": dict(SD_SCHEDULER_CONFIG)}


def _configs(family: str) -> str:
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", family)


def _scheduler_config(family: str) -> dict:
    import os

    with open(os.path.join(_configs(family), "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        return json.load(f)


def sdxl_random_components(seed: int = TINY_SEED) -> dict:
    """SDXL-base-sized components (the shipped SDXL configs: UNet, VAE, both text encoders) with random weights
    and the tiny tokenizer: for benchmarking at real size without a weights file. Not a meaningful model."""
    import os

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    configs = _configs("sdxl")
    write_tiny_tokenizer(_tokenizer_home())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(configs, "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(configs, "vae")))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(configs, "text_encoder")))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(os.path.join(configs, "text_encoder_2")))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": CLIPTokenizer.from_pretrained(_tokenizer_home()),
            "tokenizer_2": CLIPTokenizer.from_pretrained(_tokenizer_home(), pad_token="!"),
            "scheduler_config": _scheduler_config("sdxl")}


def flux_random_components(seed: int = TINY_SEED) -> dict:
    """FLUX.1-dev-sized transformer and VAE (the shipped configs) with random weights, CLIP-L, and a T5 of T5-XXL's
    width with 2 layers (the text is encoded once per run; its 24 layers' 4.7 B weights would only lengthen the
    build): for benchmarking the denoiser at real size without a weights file. Not a meaningful model."""
    import os

    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from .flux import FluxNetwork

    write_tiny_tokenizer(_tokenizer_home())
    tokenizer = CLIPTokenizer.from_pretrained(_tokenizer_home())
    t5 = T5Config.from_pretrained(os.path.join(_configs("t5xxl"), "config.json"))
    t5.num_layers = 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(os.path.join(_configs("flux-dev"), "transformer")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(_configs("flux-vae")))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(_configs("sd15"), "text_encoder")))
        text_encoder_2 = T5EncoderModel(t5)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return {"unet": FluxNetwork(transformer), "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "text_encoder_2": text_encoder_2, "tokenizer_2": CLIPTokenizer.from_pretrained(_tokenizer_home()),
            "scheduler_config": _scheduler_config("flux-dev")}
