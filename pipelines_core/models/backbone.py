"""What the sampler needs from a model family, in one place: the backbone seam.

A family says how a prompt becomes what its denoiser reads (`encode`), what else each UNet call takes beside the
prompt's hidden states (`added_conditioning`: SDXL's pooled text embedding and size/crop ids), and which methods it
cannot serve (`refuses`), so the sampler, the inversion and the methods ask the family instead of assuming
SD-1.5. Everything else they need is already family-neutral in diffusers' own modules: the latent format is the
VAE's config (channels, `scaling_factor`, `shift_factor`), the prediction type the scheduler's, and which attention
modules are self- and which cross-attention their names (`attn1`/`attn2` in every diffusers UNet).

Families:
  * SD-1.x/2.x-shaped UNets: one CLIP text encoder, its last hidden states; nothing added;
  * SDXL: two CLIP text encoders, the penultimate hidden states of both side by side (768 + 1280 = 2048 wide),
    the second encoder's projected pooled embedding and the six size/crop ids added to the timestep embedding,
    exactly as diffusers' `StableDiffusionXLPipeline.encode_prompt` / `_get_add_time_ids` compute them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class PromptEmbeds:
    """A prompt as a denoiser reads it: `hidden` (1, tokens, width) are the UNet's encoder hidden states;
    `pooled` (1, P), where the family has one, goes into its added conditioning."""

    hidden: Tensor
    pooled: Optional[Tensor] = None


@dataclass(frozen=True)
class AddedConditioning:
    """SDXL's added conditioning for one run: the pooled embedding of each role's prompt ("cond", "uncond",
    "source", ...) and the size/crop time ids, batched per UNet call in the call's role order."""

    pooled: dict  # role -> (1, P)
    time_ids: Tensor  # (1, 6): original size, crop top-left, target size

    def reading(self, role: str) -> "AddedConditioning":
        """The same conditioning with the "cond" rows reading `role`'s pooled embedding: for calls that run
        another prompt's embedding as their only chunk (null-text inversion's unconditional one)."""
        return replace(self, pooled={**self.pooled, "cond": self.pooled[role]})

    def unet_kwargs(self, roles: tuple, frames: int, like: Tensor) -> dict:
        missing = [role for role in roles if role not in self.pooled]
        if missing:
            raise ValueError(f"SDXL needs a pooled prompt embedding for the {', '.join(missing)} rows of a UNet call")
        text = torch.cat([self.pooled[role].to(like.device, like.dtype).expand(frames, -1) for role in roles])
        ids = self.time_ids.to(like.device, like.dtype).expand(frames * len(roles), -1)
        return {"added_cond_kwargs": {"text_embeds": text, "time_ids": ids}}


def _tokens(tokenizer, prompt: str):
    """`prompt` padded to the tokenizer's length (ids and attention mask); says which words a long prompt
    loses, as diffusers' pipelines do, rather than drop them unseen."""
    tokens = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    full = tokenizer(prompt, truncation=False, verbose=False).input_ids  # verbose=False: no 2nd warning
    limit = tokenizer.model_max_length
    if len(full) > limit:
        def short(text: str) -> str:  # one readable line, however long the prompt
            return text if len(text) <= 60 else text[:57] + "..."

        dropped = tokenizer.decode(full[limit - 1:-1])  # the text between the kept part and the end token
        logging.getLogger(__name__).warning(
            "prompt %r is %d tokens long and the text encoder reads %d: the last %d are dropped (%r); shorten it.",
            short(prompt), len(full), limit, len(full) - limit, short(dropped))
    return tokens


# Injection modes (`Injection.mode`) -> the methods' names, for refusals
METHOD_NAMES = {"fatezero": "FateZero", "edit_a_video": "Edit-A-Video", "pnp": "Plug-and-Play", "tokenflow": "TokenFlow",
                "flatten": "FLATTEN", "fresco": "FRESCO", "vid2vid-zero": "vid2vid-zero", "vidtome": "VidToMe",
                "pix2video": "Pix2Video", "rave": "RAVE", "fairy": "Fairy", "flowedit": "FlowEdit",
                "rf_inversion": "RF-Inversion"}
FLOW_METHODS = {mode: METHOD_NAMES[mode] for mode in ("flowedit", "rf_inversion")}  # methods of flow-matching models


class Backbone:
    """One model family's answers to what the sampler asks. Subclasses override what differs."""

    name = "SD-1.5"
    refused_methods: dict = {}  # injection mode -> (method name, why it cannot run on this family)

    def encode(self, model, prompt: str) -> PromptEmbeds:
        """CLIP's last hidden states (1, 77, D), as diffusers' Stable Diffusion pipelines compute them."""
        tokens = _tokens(model.tokenizer, prompt)
        mask = None
        if getattr(model.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(model.device)
        return PromptEmbeds(model.text_encoder(tokens.input_ids.to(model.device), attention_mask=mask)[0].to(model.dtype))

    schedulers = ("ddim", "euler", "dpmpp_2m")  # the sampler's schedulers this family's prediction can step
    joint_attention = False  # True: one attention over [text, image] tokens per block (MMDiT), no attn1/attn2
    size_multiple = 8  # pixels per latent pixel, times any patching of the latent

    def added_conditioning(self, model, pooled: dict, size: tuple, guidance: Optional[float] = None):
        """What each UNet call takes beside the hidden states, for a run at `size` (height, width) in pixels;
        `guidance`: a guidance-distilled model's guidance scale (Flux-dev), embedded rather than applied."""
        return None

    def guidance_split(self, cfg: float) -> tuple:
        """(classifier-free guidance the denoiser applies, guidance the network embeds) for the sampler's cfg."""
        return cfg, None

    def set_timesteps(self, scheduler, steps: int, size: tuple, device) -> None:
        scheduler.set_timesteps(steps, device=device)

    def check_run(self, settings, size: tuple, control=None, invert: bool = False) -> None:
        """Refuse, before any step, what this family cannot run: its scheduler, its size, a ControlNet."""
        if settings is not None and settings.scheduler not in self.schedulers:
            raise ValueError(f"the {settings.scheduler!r} scheduler does not step {self.name} models: choose "
                             f"{' or '.join(repr(s) for s in self.schedulers)}")
        if size[0] % self.size_multiple or size[1] % self.size_multiple:
            raise ValueError(f"{self.name} needs a size that is a multiple of {self.size_multiple} "
                             f"(got {size[1]}x{size[0]}): resize the clip (Load Video's width/height)")

    def check_method(self, mode: str) -> None:
        """Refuse, before any step, an injection this family cannot serve, by the method's name."""
        if mode in FLOW_METHODS:
            raise ValueError(f"{FLOW_METHODS[mode]} edits with a flow-matching model and {self.name} predicts noise: "
                             "load a Flux model")
        if mode in self.refused_methods:
            name, why = self.refused_methods[mode]
            raise ValueError(f"{name} does not run on {self.name} models: {why}")


SD15_LAYERS = "it picks SD-1.5's UNet layers by position, and no mapping to SDXL's has been validated: load an SD-1.5 model"


class SDXLBackbone(Backbone):
    """SDXL base: two text encoders (CLIP ViT-L, OpenCLIP bigG with projection), added text/time conditioning."""

    name = "SDXL"
    # These pick SD-1.5's UNet layers by block position and resolution (their papers' model: which decoder resnets
    # and attention levels carry features, which levels merge tokens); SDXL's blocks sit at other resolutions with
    # no attention at the first level, and no mapping has been validated. The sampler's own mechanisms (cross-frame
    # rules, chunks, SDEdit, inversion incl. null-text, ControlNet, temporal guidance) and the injections that work
    # through rules and the denoiser alone (RAVE's grids, Fairy's anchors) run on SDXL.
    refused_methods = {mode: (METHOD_NAMES[mode], SD15_LAYERS) for mode in (
        "fatezero", "edit_a_video", "pnp", "tokenflow", "flatten", "fresco", "vid2vid-zero", "vidtome", "pix2video")}

    def encode(self, model, prompt: str) -> PromptEmbeds:
        hidden, pooled = [], None
        for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
            out = encoder(_tokens(tokenizer, prompt).input_ids.to(model.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # only the projecting (second) encoder gives the pooled one
                pooled = out[0]
            hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both
        return PromptEmbeds(torch.cat(hidden, dim=-1).to(model.dtype), pooled.to(model.dtype))

    def added_conditioning(self, model, pooled: dict, size: tuple, guidance: Optional[float] = None) -> AddedConditioning:
        """diffusers' defaults: original size = target size = the run's, no crop (`_get_add_time_ids`)."""
        height, width = size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=model.dtype)
        expected = model.unet.add_embedding.linear_1.in_features
        got = model.unet.config.addition_time_embed_dim * time_ids.shape[1] + model.text_encoder_2.config.projection_dim
        if got != expected:
            raise ValueError(f"the SDXL UNet expects {expected} added-conditioning features and its text encoder and "
                             f"time ids give {got}: the UNet and the second text encoder do not belong together")
        return AddedConditioning(pooled, time_ids)


@dataclass(frozen=True)
class FluxConditioning:
    """Flux's per-call conditioning: the CLIP pooled embedding of each role's prompt and, on guidance-distilled
    models, the guidance scale (one per role: FlowEdit guides source and target differently)."""

    pooled: dict  # role -> (1, P)
    guidance: Optional[dict] = None  # role -> guidance scale; None: the model embeds none (Flux-schnell)

    def with_guidance(self, **scales) -> "FluxConditioning":
        return replace(self, guidance={**(self.guidance or {}), **scales}) if self.guidance is not None else self

    def unet_kwargs(self, roles: tuple, frames: int, like: Tensor) -> dict:
        pooled = torch.cat([self.pooled[role].to(like.device, like.dtype).expand(frames, -1) for role in roles])
        added = {"pooled": pooled}
        if self.guidance is not None:
            added["guidance"] = torch.tensor([float(self.guidance[role]) for role in roles for _ in range(frames)],
                                             device=like.device, dtype=torch.float32)
        return {"added_cond_kwargs": added}


class FluxBackbone(Backbone):
    """Flux.1 (dev, schnell): an MMDiT on 2x2-packed 16-channel latents, flow matching (velocity prediction),
    T5 hidden states + CLIP pooled embedding, guidance embedded on the distilled dev model (no negative prompt)."""

    name = "Flux"
    schedulers = ("flow_euler",)
    joint_attention = True
    size_multiple = 16  # 8x VAE, then 2x2 patches
    max_text_tokens = 512  # FluxPipeline's max_sequence_length

    def check_method(self, mode: str) -> None:
        if mode not in FLOW_METHODS:
            raise ValueError(f"{METHOD_NAMES.get(mode, mode)} does not run on Flux models: it is written for UNets; "
                             "on Flux use FlowEdit or RF-Inversion, or load an SD-1.5 model")

    def encode(self, model, prompt: str) -> PromptEmbeds:
        """CLIP's pooled output and T5's last hidden states, as `FluxPipeline.encode_prompt` computes them."""
        clip = _tokens(model.tokenizer, prompt)
        pooled = model.text_encoder(clip.input_ids.to(model.device), output_hidden_states=False).pooler_output
        tokenizer = model.tokenizer_2
        length = min(int(tokenizer.model_max_length), self.max_text_tokens)
        ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        hidden = model.text_encoder_2(ids.to(model.device), output_hidden_states=False)[0]
        return PromptEmbeds(hidden.to(model.dtype), pooled.to(model.dtype))

    def added_conditioning(self, model, pooled: dict, size: tuple, guidance: Optional[float] = None):
        embeds = bool(getattr(model.unet.config, "guidance_embeds", False))
        scales = {role: guidance for role in pooled} if embeds else None
        return FluxConditioning(pooled, scales)

    def guidance_split(self, cfg: float) -> tuple:
        return 1.0, cfg  # distilled guidance: one network call per step, the scale goes in as an embedding

    def set_timesteps(self, scheduler, steps: int, size: tuple, device) -> None:
        """FluxPipeline's schedule: sigmas 1 .. 1/steps, shifted by mu for the image's token count."""
        import numpy as np

        tokens = (size[0] // self.size_multiple) * (size[1] // self.size_multiple)
        config = scheduler.config
        slope = (config.get("max_shift", 1.15) - config.get("base_shift", 0.5)) / (
            config.get("max_image_seq_len", 4096) - config.get("base_image_seq_len", 256))
        mu = config.get("base_shift", 0.5) + slope * (tokens - config.get("base_image_seq_len", 256))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)

    def check_run(self, settings, size: tuple, control=None, invert: bool = False) -> None:
        super().check_run(settings, size)
        if settings is not None and settings.attention_layers != "all":
            raise ValueError(f"attention_layers {settings.attention_layers!r} names UNet decoder layers; Flux's "
                             "blocks have none: set attention_layers to 'all'")
        if control is not None and len(control):
            raise ValueError("ControlNet Condition does not run on Flux models yet (its ControlNets are UNet "
                             "ControlNets): disconnect it, or load an SD-1.5 or SDXL model")
        if invert:
            raise ValueError("DDIM Invert inverts noise-predicting models; Flux predicts velocities: use RF-Inversion "
                             "(or FlowEdit, which needs no inversion)")


SD = Backbone()
SDXL = SDXLBackbone()
FLUX = FluxBackbone()


def backbone_of(unet) -> Backbone:
    """The family of a denoiser network: Flux's wrapper says so; SDXL's UNet adds text and time embeddings."""
    if getattr(unet, "family", None) == "flux":
        return FLUX
    return SDXL if getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time" else SD


def blank_unet_kwargs(config, rows: int, dtype=torch.float32) -> dict:
    """Added-conditioning kwargs of the right shapes and any values, for UNet passes that only measure (shapes,
    memory on fake or meta tensors): {} for UNets without any."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    if get("pooled_projection_dim") is not None:  # Flux: the CLIP pooled embedding, and guidance if distilled
        guidance = torch.full((rows,), 3.5) if get("guidance_embeds") else None
        return {"added_cond_kwargs": {"pooled": torch.zeros(rows, get("pooled_projection_dim"), dtype=dtype),
                                      "guidance": guidance}}
    if get("addition_embed_type") != "text_time":
        return {}
    ids = 6  # original size, crop top-left, target size
    pooled = get("projection_class_embeddings_input_dim") - ids * get("addition_time_embed_dim")
    return {"added_cond_kwargs": {"text_embeds": torch.zeros(rows, pooled, dtype=dtype),
                                  "time_ids": torch.zeros(rows, ids, dtype=dtype)}}
