"""Load Model's engine: a Stable Diffusion model as its components, from wherever the user keeps it.

Sources (all offline; nothing is ever downloaded):
  * "builtin:tiny"                - a small random SD-shaped model built in-process (tiny.py);
  * "builtin:sd15-random"         - SD-1.5-sized with random weights, for benchmarks (tiny.py);
  * "builtin:tiny-ip2p"           - builtin:tiny with an 8-channel UNet: an InstructPix2Pix-shaped model (tiny.py);
  * "builtin:tiny-sdxl", "builtin:tiny-flux" - SDXL's and Flux's layouts in small, random weights (tiny.py);
  * "builtin:sdxl-random", "builtin:flux-random" - SDXL- and FLUX.1-dev-sized, random weights, for benchmarks;
  * a diffusers folder            - a directory holding model_index.json and unet/ vae/ text_encoder/ tokenizer/
                                    (SDXL: also text_encoder_2/ tokenizer_2/; Flux: transformer/ and T5);
  * a single-file checkpoint      - .safetensors/.ckpt in the original SD layout, converted with the
                                    SD-1.5 component configs shipped in configs/sd15 (single_file.py), or an
                                    SDXL base file with configs/sdxl (sdxl_single_file.py), or a FLUX.1
                                    transformer file with its ae/clip_l/t5xxl files beside it or in given
                                    folders (flux_single_file.py);
                                    an InstructPix2Pix file (8-channel conv_in) is recognised by its weights;
  * a state dict in that layout   - already in memory, e.g. the model a ComfyUI graph loaded and patched
                                    (`model_from_state_dict`; the same conversion as a file).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ..video.frames import check_image_batch
from .backbone import Backbone, PromptEmbeds, backbone_of

BUILTIN_TINY = "builtin:tiny"
BUILTIN_SD15_RANDOM = "builtin:sd15-random"  # SD-1.5-sized, random weights: for benchmarks only
BUILTIN_TINY_IP2P = "builtin:tiny-ip2p"  # builtin:tiny with InstructPix2Pix's 8-channel UNet: for tests and demos
BUILTIN_TINY_SDXL = "builtin:tiny-sdxl"  # SDXL's layout in small (two text encoders, added conditioning)
BUILTIN_TINY_FLUX = "builtin:tiny-flux"  # Flux's layout in small (MMDiT, flow matching, T5 + CLIP)
BUILTIN_SDXL_RANDOM = "builtin:sdxl-random"  # SDXL-base-sized, random weights: for benchmarks only
BUILTIN_FLUX_RANDOM = "builtin:flux-random"  # FLUX.1-dev-sized transformer and VAE, random weights: benchmarks
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda", "mps")
CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True, eq=False)
class VEModel:
    """The components a video sampler needs, plus where they came from.

    Frozen: nodes that change a model (LoRA Apply) return a new VEModel via `replace`, sharing the
    weights, so a model another branch of the graph uses is never altered.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    source: str
    device: torch.device
    dtype: torch.dtype
    loras: tuple = field(default=())
    text_encoder_2: Optional[torch.nn.Module] = None  # SDXL's second (projecting) text encoder
    tokenizer_2: object = None

    @property
    def backbone(self) -> Backbone:
        """The model's family: how prompts are encoded and what else its UNet reads (`backbone.py`)."""
        return backbone_of(self.unet)

    @property
    def vae_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_shift(self) -> float:
        """The VAE latents' offset (Flux's; 0 for SD): sampled latents are (raw - shift) * scale."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (ComfyUI's LATENT convention) -> the latents the sampler denoises."""
        return (raw - self.vae_shift) * self.vae_scale if self.vae_shift else raw * self.vae_scale

    def unscaled(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampler's latents -> raw VAE latents (ComfyUI's LATENT convention)."""
        return latents / self.vae_scale + self.vae_shift if self.vae_shift else latents / self.vae_scale

    @property
    def latent_channels(self) -> int:
        """Channels of the latent being denoised (the VAE's), whatever else the UNet reads."""
        return int(self.vae.config.latent_channels)

    @property
    def is_instruction(self) -> bool:
        """An InstructPix2Pix UNet: it reads the noisy latent and the source frame's latent side by side on
        channels (twice the VAE's), so sampling must give it the source (sampling.denoiser.ImageConditioning)."""
        return int(self.unet.config.in_channels) == 2 * self.latent_channels

    @property
    def kind(self) -> str:
        """What Load Model found, in words."""
        if self.is_instruction:
            return "an InstructPix2Pix instruction model (8-channel UNet: it edits source frames by instruction)"
        if self.backbone.name == "SDXL":
            return "an SDXL text-to-image model (two text encoders, 4-channel UNet)"
        if self.backbone.name == "Flux":
            return "a Flux flow-matching model (MMDiT on 16-channel latents, T5 + CLIP)"
        return f"a text-to-image model ({self.unet.config.in_channels}-channel UNet)"

    def with_changes(self, **changes) -> "VEModel":
        return replace(self, **changes)

    def __repr__(self) -> str:  # ComfyUI str()s inputs into error reports: keep it short
        extra = ", instruction" if self.is_instruction else ""
        extra += f", {self.backbone.name}" if self.text_encoder_2 is not None else ""
        extra += f", {len(self.loras)} LoRA" if self.loras else ""
        return f"VEModel({self.source!r}, {str(self.dtype).removeprefix('torch.')}, {self.device}{extra})"


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU; never hard-codes one."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; choose 'auto' or 'cpu'")
    return torch.device(device)


def is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


# model_index.json's pipeline class -> the family Load Model says it found, for the ones it loads
FOLDER_FAMILIES = {"StableDiffusionPipeline": "SD-1.5", "StableDiffusionImg2ImgPipeline": "SD-1.5",
                   "StableDiffusionInstructPix2PixPipeline": "InstructPix2Pix",
                   "StableDiffusionXLPipeline": "SDXL", "StableDiffusionXLImg2ImgPipeline": "SDXL",
                   "FluxPipeline": "Flux", "FluxImg2ImgPipeline": "Flux"}


def _load_diffusers_folder(path: str, torch_dtype: torch.dtype) -> dict:
    """A diffusers folder of a family the pack runs (SD-1.x, InstructPix2Pix, SDXL with both text encoders),
    read offline; any other pipeline class is refused by name before a weight is read."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def sub(name: str) -> str:
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"diffusers folder {path!r} has no {name}/ subfolder; is it a Stable Diffusion model?")
        return folder

    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    kind = index.get("_class_name", "")
    if kind not in FOLDER_FAMILIES:
        raise ValueError(f"diffusers folder {path!r} holds a {kind or 'pipeline without _class_name'}; Load Model "
                         "runs SD-1.x, InstructPix2Pix, SDXL (base) and Flux.1 folders")
    if FOLDER_FAMILIES[kind] == "Flux":
        return _load_flux_folder(path, torch_dtype)
    sdxl = FOLDER_FAMILIES.get(kind) == "SDXL"
    if sdxl and not (index.get("text_encoder") and index["text_encoder"][0]):
        raise ValueError(f"diffusers folder {path!r} is an SDXL refiner (one text encoder): load the SDXL base model")
    with open(os.path.join(sub("scheduler"), "scheduler_config.json"), encoding="utf-8") as f:
        scheduler_config = json.load(f)
    kw = dict(torch_dtype=torch_dtype, local_files_only=True)
    parts = {
        "unet": UNet2DConditionModel.from_pretrained(sub("unet"), **kw),
        "vae": AutoencoderKL.from_pretrained(sub("vae"), **kw),
        "text_encoder": CLIPTextModel.from_pretrained(sub("text_encoder"), **kw),
        "tokenizer": CLIPTokenizer.from_pretrained(sub("tokenizer"), local_files_only=True),
        "scheduler_config": scheduler_config,
    }
    if sdxl:
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(sub("text_encoder_2"), **kw)
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(sub("tokenizer_2"), local_files_only=True)
    return parts


def _load_flux_folder(path: str, torch_dtype: torch.dtype) -> dict:
    """A Flux.1 diffusers folder (transformer, VAE, CLIP + T5 with their tokenizers, scheduler), offline."""
    import json

    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    from .flux import FluxNetwork

    def sub(name: str) -> str:
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Flux folder {path!r} has no {name}/ subfolder")
        return folder

    with open(os.path.join(sub("scheduler"), "scheduler_config.json"), encoding="utf-8") as f:
        scheduler_config = json.load(f)
    kw = dict(torch_dtype=torch_dtype, local_files_only=True)
    return {
        "unet": FluxNetwork(FluxTransformer2DModel.from_pretrained(sub("transformer"), **kw)),
        "vae": AutoencoderKL.from_pretrained(sub("vae"), **kw),
        "text_encoder": CLIPTextModel.from_pretrained(sub("text_encoder"), **kw),
        "tokenizer": CLIPTokenizer.from_pretrained(sub("tokenizer"), local_files_only=True),
        "text_encoder_2": T5EncoderModel.from_pretrained(sub("text_encoder_2"), **kw),
        "tokenizer_2": AutoTokenizer.from_pretrained(sub("tokenizer_2"), local_files_only=True),
        "scheduler_config": scheduler_config,
    }


def load_components(source: str, torch_dtype: torch.dtype, tokenizer_dir: Optional[str] = None,
                    tokenizer_candidates: Sequence[str] = (), flux_search_dirs: Sequence[str] = (),
                    t5_tokenizer_candidates: Sequence[str] = ()) -> dict:
    if source == BUILTIN_TINY:
        from .tiny import tiny_components

        return tiny_components()
    if source == BUILTIN_SD15_RANDOM:
        from .tiny import sd15_random_components

        return sd15_random_components()
    if source == BUILTIN_TINY_IP2P:
        from .tiny import tiny_ip2p_components

        return tiny_ip2p_components()
    if source == BUILTIN_TINY_SDXL:
        from .tiny import tiny_sdxl_components

        return tiny_sdxl_components()
    if source == BUILTIN_TINY_FLUX:
        from .tiny import tiny_flux_components

        return tiny_flux_components()
    if source == BUILTIN_SDXL_RANDOM:
        from .tiny import sdxl_random_components

        return sdxl_random_components()
    if source == BUILTIN_FLUX_RANDOM:
        from .tiny import flux_random_components

        return flux_random_components()
    if is_diffusers_folder(source):
        return _load_diffusers_folder(source, torch_dtype)
    if os.path.isfile(source) and source.lower().endswith(CHECKPOINT_EXTENSIONS):
        from .flux_single_file import is_flux_transformer_file, load_flux_model

        if is_flux_transformer_file(source):  # from the header: the transformer alone, its other parts beside it
            return load_flux_model(source, search_dirs=tuple(flux_search_dirs), clip_tokenizer_dir=tokenizer_dir or None,
                                   clip_tokenizer_candidates=tuple(tokenizer_candidates),
                                   t5_tokenizer_candidates=tuple(t5_tokenizer_candidates), torch_dtype=torch_dtype)
        from .sdxl_single_file import load_checkpoint_file  # SD-1.x or SDXL base, told apart by the keys
        from .single_file import find_tokenizer_dir

        tok = find_tokenizer_dir(source, tokenizer_dir or None, tuple(tokenizer_candidates))
        return load_checkpoint_file(source, tokenizer_dir=tok, torch_dtype=torch_dtype)
    if os.path.isdir(source):
        raise FileNotFoundError(f"{source!r} is a folder without model_index.json: point at a diffusers model folder")
    raise FileNotFoundError(
        f"model {source!r} not found: give a builtin (e.g. 'builtin:tiny'), a diffusers folder, or a "
        ".safetensors/.ckpt file"
    )


def _dtype_and_device(dtype: str, device: str) -> tuple[torch.dtype, torch.device]:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    target = resolve_device(device)
    if target.type == "cpu" and torch_dtype == torch.float16:
        raise ValueError("fp16 on the CPU is unsupported by many kernels; choose fp32 (or bf16) for the CPU")
    return torch_dtype, target


def _assemble(parts: dict, source: str, target: torch.device, torch_dtype: torch.dtype) -> VEModel:
    """Components on `target` in `torch_dtype`, ready for sampling (eval mode, no grads)."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if parts.get(name) is None:
            continue
        module = parts[name].to(device=target)
        if module.dtype != torch_dtype:
            module = module.to(dtype=torch_dtype)
        parts[name] = module.eval().requires_grad_(False)
    return VEModel(source=source, device=target, dtype=torch_dtype, **parts)


def load_model(source: str, dtype: str = "fp32", device: str = "auto", tokenizer_dir: Optional[str] = None,
               tokenizer_candidates: Sequence[str] = (), flux_search_dirs: Sequence[str] = (),
               t5_tokenizer_candidates: Sequence[str] = ()) -> VEModel:
    """Load a model and put it on `device` in `dtype`, ready for sampling (eval mode, no grads). A FLUX.1
    transformer file's VAE, CLIP and T5 files are looked for beside it and in `flux_search_dirs`."""
    torch_dtype, target = _dtype_and_device(dtype, device)
    parts = load_components(source, torch_dtype, tokenizer_dir, tokenizer_candidates, flux_search_dirs,
                            t5_tokenizer_candidates)
    return _assemble(parts, source, target, torch_dtype)


def model_from_state_dict(state: dict, tokenizer, dtype: str = "fp32", device: str = "auto",
                          source: str = "state dict", config_dir: Optional[str] = None,
                          tokenizer_2=None) -> VEModel:
    """A model from an SD-1.5, SDXL base or FLUX.1 state dict in the original single-file layout, as a file would
    give it.

    The family is read from the keys, as for a file: SDXL's (`conditioner.embedders.0.` and `.1.`) goes through
    `sdxl_single_file.components_from_sdxl_state_dict` and needs `tokenizer_2`, SDXL's second tokenizer (padding
    with "!"); Flux's (BFL's `double_blocks.`/`single_blocks.` under `model.diffusion_model.`, in ComfyUI's saved
    layout: `flux_single_file.STATE_PARTS`) through `flux_single_file.components_from_flux_state_dict` and needs
    `tokenizer_2`, T5's tokenizer; anything else through the SD-1.5 conversion, which refuses other families by
    name. `tokenizer` (and SDXL's `tokenizer_2`) are CLIP tokenizer objects (e.g. ComfyUI's own; a capped copy is
    used if one pads beyond 77). The model's weights are copies: `state` and its owner are never changed, and later
    changes to them (a ComfyUI model being patched or unpatched) do not reach the model. `source` names it in
    errors and repr; `config_dir` defaults to the shipped configs of the family (configs/sd15, configs/sdxl, or for
    Flux the configs/ root holding flux-dev/, flux-schnell/, flux-vae/, t5xxl/: `FluxConfigs.at`).
    """
    from .single_file import _family, components_from_state_dict

    torch_dtype, target = _dtype_and_device(dtype, device)
    label = f"'{source}'"
    family = _family(state)
    if family == "Flux":
        from .flux_single_file import FluxConfigs, components_from_flux_state_dict

        if tokenizer_2 is None:
            raise ValueError(f"{label} is Flux: its T5 tokenizer (tokenizer_2) is needed too.")
        parts = components_from_flux_state_dict(state, tokenizer, tokenizer_2, torch_dtype=torch_dtype, label=label,
                                                configs=FluxConfigs.at(config_dir) if config_dir else None)
    elif family == "SDXL":
        from .sdxl_single_file import components_from_sdxl_state_dict

        if tokenizer_2 is None:
            raise ValueError(f"{label} is SDXL: its second tokenizer (tokenizer_2, padding with '!') is needed too.")
        parts = components_from_sdxl_state_dict(state, tokenizer, tokenizer_2, config_dir=config_dir,
                                                torch_dtype=torch_dtype, label=label)
    else:
        parts = components_from_state_dict(state, tokenizer, config_dir=config_dir, torch_dtype=torch_dtype,
                                           label=label)
    return _assemble(parts, source, target, torch_dtype)


# --- what every recipe does with a model -------------------------------------------------------

@torch.no_grad()
def encode_text(model: VEModel, prompt: str) -> PromptEmbeds:
    """The prompt as the model's denoiser reads it (hidden states, and SDXL's pooled embedding), exactly as
    diffusers' pipeline for its family computes it."""
    return model.backbone.encode(model, prompt)


def encode_prompt(model: VEModel, prompt: str) -> torch.Tensor:
    """The UNet's encoder hidden states for `prompt` (1, 77, D)."""
    return encode_text(model, prompt).hidden


def frames_to_pixels(frames: torch.Tensor, model: VEModel) -> torch.Tensor:
    """ComfyUI IMAGE (F, H, W, 3) in 0..1 -> VAE input (F, 3, H, W) in -1..1 on the model's device."""
    return (frames.permute(0, 3, 1, 2) * 2 - 1).to(model.device, model.dtype)


def _encode_batch(model: VEModel, frames: torch.Tensor, generators: Optional[Sequence[torch.Generator]]) -> list:
    """One VAE call on IMAGE frames -> their UNSCALED latents (1, 4, h, w) each: the posterior mean, or with one
    generator per frame a posterior sample drawn the way diffusers' img2img draws it."""
    from diffusers.utils.torch_utils import randn_tensor

    dist = model.vae.encode(frames_to_pixels(frames, model)).latent_dist
    out = []
    for j in range(dist.mean.shape[0]):
        mean, std = dist.mean[j:j + 1], dist.std[j:j + 1]
        if generators is None:
            out.append(mean)
        else:
            noise = randn_tensor(mean.shape, generator=generators[j], device=mean.device, dtype=mean.dtype)
            out.append(mean + std * noise)
    return out


@torch.no_grad()
def encode_frames(model: VEModel, frames: torch.Tensor, generators: Optional[Sequence[torch.Generator]] = None,
                  batch: int = 4) -> torch.Tensor:
    """Scaled latents (F, 4, H/8, W/8). With `generators` (one per frame) the VAE posterior is sampled
    the way diffusers' img2img does; without, its mean is taken (deterministic, for inversion)."""
    out = []
    for start in range(0, frames.shape[0], batch):
        gens = None if generators is None else generators[start:start + batch]
        out.extend(_encode_batch(model, frames[start:start + batch], gens))
    return model.scaled(torch.cat(out))


def posterior_generators(seed: int) -> Iterator[torch.Generator]:
    """Endless per-frame CPU generators, frame f seeded `seed + f`: the sampler's `frame_generators` for a clip
    whose length is not known yet. The sampler draws frame f's VAE posterior sample first from generator f, so
    a streaming encode drawing with these gives the very latents an in-memory images start would."""
    for f in itertools.count():
        yield torch.Generator("cpu").manual_seed(seed + f)


@torch.no_grad()
def encode_frame_stream(model: VEModel, frame_batches: Iterable[torch.Tensor],
                        generators: Optional[Iterable[torch.Generator]] = None, batch: int = 4) -> torch.Tensor:
    """IMAGE batches of any sizes (e.g. `video.decode.open_video(...).batches()`) -> UNSCALED latents (F, 4, h, w)
    on the CPU in fp32 (ComfyUI's LATENT convention), holding no more than `batch` frames of pixels beyond the
    batch the stream hands over.

    Frames are regrouped into VAE calls of `batch` frames counted from frame 0, the grouping `encode_frames`
    uses, and each frame's posterior sample is drawn from the next of `generators` (see `posterior_generators`),
    so with the sampler's seed the result times the VAE scale is bit for bit `encode_frames(model, all frames,
    frame_generators(seed, F))`: the sampler's latent start then edits exactly as its images start would.
    Without `generators`, the posterior mean. (Progress: the frame stream's own, e.g. open_video's.)
    """
    gens = iter(generators) if generators is not None else None
    out: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    held = 0

    def flush(parts: list[torch.Tensor]) -> None:
        frames = parts[0] if len(parts) == 1 else torch.cat(parts)
        draws = None if gens is None else [next(gens) for _ in range(frames.shape[0])]
        # To the CPU at once: the latents of a long clip must not pile up in GPU memory.
        out.extend(z.float().cpu() for z in _encode_batch(model, frames, draws))

    for frames in frame_batches:
        check_image_batch(frames, "frames")
        start = 0
        while start < frames.shape[0]:
            take = min(batch - held, frames.shape[0] - start)
            pending.append(frames[start:start + take])
            held, start = held + take, start + take
            if held == batch:
                flush(pending)
                pending, held = [], 0
    if pending:
        flush(pending)
    if not out:
        raise ValueError("no frames to encode: the frame stream was empty")
    return torch.cat(out)


@torch.no_grad()
def decode_latent_stream(model: VEModel, latents: torch.Tensor, batch: int = 4, scaled: bool = True,
                         progress=None) -> Iterator[torch.Tensor]:
    """Latents (F, 4, h, w) -> ComfyUI IMAGE batches (n <= `batch`, 8h, 8w, 3) in 0..1 on the CPU, decoded only as
    they are asked for, so a consumer (Video Encode) never holds the clip in pixels. `scaled`: False for
    UNSCALED latents (ComfyUI's LATENT), decoded as they are rather than scaled up and down again, which is not
    exact in floating point: a LATENT of `latents / vae_scale` then decodes bit for bit as `latents` does."""
    total = latents.shape[0]
    for start in range(0, total, batch):
        chunk = latents[start:start + batch].to(model.device, model.vae.dtype)
        if scaled:
            chunk = model.unscaled(chunk)
        pixels = model.vae.decode(chunk).sample
        yield ((pixels.float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).cpu()
        if progress is not None:
            progress(min(start + batch, total), total)


@torch.no_grad()
def decode_latents(model: VEModel, latents: torch.Tensor, batch: int = 4, progress=None) -> torch.Tensor:
    """Scaled latents (F, 4, h, w) -> ComfyUI IMAGE (F, 8h, 8w, 3) in 0..1 on the CPU, a few frames at a time."""
    return torch.cat(list(decode_latent_stream(model, latents, batch, progress=progress)))
