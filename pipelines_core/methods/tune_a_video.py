"""Tune-A-Video's one-shot tuning (Wu et al., ICCV'23) as a LoRA: the model learns the clip before it edits it.

The paper fine-tunes a text-to-image model on the one clip it will edit, with its source prompt, so that DDIM
inversion and sampling with an edited prompt keep the clip's motion and look. What this module does:

  * Attention: every spatial self-attention (attn1) reads the keys and values of [frame 0, frame i-1]
    (sparse-causal attention, the pack's `first+previous` rule), in training exactly as at inference.
    Cross-attention and everything else act on each frame alone.
  * Trainable parameters: a LoRA (peft) on the query projections the paper tunes, `attn1.to_q` (spatial
    self-attention) and `attn2.to_q` (cross-attention). The base weights are frozen and never change: after
    tuning they are bit for bit what they were.
  * Loss: the ordinary denoising loss. Each step draws one timestep t ~ U{0..T-1} for the whole clip (as the
    paper's `randint(0, T, (bsz,))` with one video per batch) and Gaussian noise for every frame, from a
    generator seeded by `seed`, and minimises MSE(eps_theta(x_t, t, c), eps) (the velocity for v-prediction
    models), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM, eq. 4), with AdamW (weight decay 1e-2, the
    paper's optimiser settings).
  * The result is a diffusers/peft LoRA file (`unet.<layer>.lora_A.weight` / `lora_B.weight`, the adapter
    config in the header as diffusers' `save_lora_weights` writes it), which LoRA Apply loads.

Where the pack parts from the paper:
  * The LoRA covers the query projections only. Tune-A-Video also adds a new temporal attention layer
    (`attn_temp`) to every transformer block and trains it. A new layer changes the model's architecture:
    the file would no longer be a LoRA of SD-1.5, LoRA Apply, DDIM Invert, the sampler, the ControlNet
    copy and every checkpoint loader would have to know the extra modules. Sparse-causal attention (which
    needs no weights) carries the cross-frame consistency instead, as it does in every workflow of the pack.
  * A low-rank update (rank 4 by default) instead of full fine-tuning of the query matrices: 0.2 M trained
    parameters for SD-1.5 instead of 25 M (a 0.8 MB file instead of 50 MB), it stacks with other LoRAs, and the
    loaded model shared by the rest of the graph is never changed.
  * Defaults: 200 steps at lr 1e-4 (the paper: 500 steps at lr 3e-5 with full-rank updates, 8 frames at 512²).
    A rank-4 LoRA starts from a zero update and has far fewer parameters than the full query matrices, so it
    takes a larger learning rate (LoRA practice for SD is 1e-4) and needs fewer steps to fit one clip; 200
    steps are 40% of the paper's budget (its 500 steps take about 10 minutes on an A100), so a few minutes on
    a local GPU, and with gradient checkpointing a step fits an 8 GiB card (see below).
  * The clip is VAE-encoded once (a posterior sample drawn with the seed) rather than at every step.
  * The model's own LoRAs (LoRA Apply before this node) stay active while tuning, so the new LoRA learns
    what they do not already give; the returned model stacks it on top of them.

Memory: `tuning_step_bytes` counts one training step (forward and backward of the UNet with the LoRA) on fake
tensors (torch's FakeTensorMode + MemTracker, as sampling/budget.py does for sampling). SD-1.5 in fp16, 8 frames
at 512², rank 4: 3.40 GiB at the peak with gradient checkpointing (1.60 UNet weights, 1.53 activations, 0.27
temporaries), 8.43 GiB without (6.56 activations); plus the VAE and text encoder (0.4 GiB). Where the weights
are inference tensors (loaded under ComfyUI's inference mode) tuning computes with a copy of the UNet's weights
(`autograd_weights`): 1.6 GiB more.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ..attention import VideoAttnProcessor, attention_processors
from ..attention.attach import is_self_attention
from ..attention.processor import FrameLayout
from ..attention.rules import first_and_previous, own_frame
from ..models.lora import adapter_weights, lora_scope
from ..models.model import VEModel, encode_frames, encode_prompt, posterior_generators
from ..progress import Progress, or_silent
from ..video.encode import reserve_output_path
from ..video.frames import check_image_batch
from ..sampling.gradients import local_gradients

QUERY_LAYERS = ("attn1.to_q", "attn2.to_q")  # what the paper tunes of the image model (besides attn_temp)
ADAPTER = "tune_on_clip"  # the peft adapter name while tuning; gone once tuning ends
EVAL_TIMESTEPS = (100, 300, 500, 700, 900)  # the fixed noise levels `loss_before`/`loss_after` are measured at
WEIGHT_DECAY = 1e-2  # Tune-A-Video's adam_weight_decay


@dataclass(frozen=True)
class TuneSettings:
    prompt: str  # the clip's source prompt (the caption the edit prompt changes words of)
    steps: int = 200
    learning_rate: float = 1e-4
    rank: int = 4
    seed: int = 0
    gradient_checkpointing: bool = True

    def __post_init__(self):
        if not self.prompt.strip():
            raise ValueError("Tune on Clip: prompt is empty: describe the clip (e.g. 'a man is skiing'); the edit "
                             "prompt then changes words of it")
        if self.steps < 1:
            raise ValueError(f"Tune on Clip: steps must be at least 1 (got {self.steps})")
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            raise ValueError(f"Tune on Clip: learning_rate must be in (0, 1] (got {self.learning_rate}); "
                             "1e-4 suits a rank-4 LoRA")
        if self.rank < 1:
            raise ValueError(f"Tune on Clip: rank must be at least 1 (got {self.rank})")


@dataclass(frozen=True)
class TuneResult:
    """The tuned LoRA, in diffusers' file layout, and what tuning measured."""

    lora: dict  # {"unet.<layer>.lora_A.weight": tensor, ...} on the CPU, fp32
    config: dict  # the peft LoraConfig of the adapter (what diffusers writes into the file header)
    losses: tuple  # the training loss of every step
    loss_before: float  # the denoising loss on the clip at EVAL_TIMESTEPS, before and after tuning
    loss_after: float


# --- the recipe ----------------------------------------------------------------------------------------------

def tune_on_clip(model: VEModel, frames: torch.Tensor, settings: TuneSettings,
                 progress: Optional[Progress] = None) -> TuneResult:
    """Tune a query-projection LoRA on `frames` (ComfyUI IMAGE) with `settings.prompt`; `model` is unchanged.

    Runs also under ComfyUI's `torch.inference_mode()`: every tensor that takes part in training is made
    inside `inference_mode(False)`. `progress(done, steps)` after every step may raise to cancel (then nothing
    is returned and the modules are as they were).
    """
    # 1. Check everything before the first step
    check_image_batch(frames, "Tune on Clip: frames", multiple_of=8)
    if model.backbone.name != "SD-1.5":
        raise ValueError(f"Tune on Clip trains SD-1.5 UNets (Tune-A-Video's model); {model!r} is "
                         f"{model.backbone.name}: load an SD-1.5 model to tune")
    progress = or_silent(progress)
    with local_gradients():
        # 2. The clip's latents and the prompt's embeddings, as normal (not inference) tensors
        clip = frames.clone()  # a ComfyUI IMAGE made under inference mode cannot be saved for backward
        count = clip.shape[0]
        latents = encode_frames(model, clip, list(itertools.islice(posterior_generators(settings.seed), count)))
        context = encode_prompt(model, settings.prompt).expand(count, -1, -1)
        scheduler = _noise_schedule(model)
        layout = FrameLayout(count, tuple(range(count)), ("cond",))

        # 3. The LoRA on the queries, sparse-causal attention; then the denoising loss, step by step
        with lora_scope(model), autograd_weights(model.unet), query_lora(model, settings) as params, \
                attention_processors(model.unet, sparse_causal), checkpointing(model.unet, settings):
            loss_on_clip = _clip_loss(model, latents, context, scheduler, layout, settings.seed)
            loss_before = loss_on_clip()
            optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=WEIGHT_DECAY)
            scaler = torch.amp.GradScaler(model.device.type, enabled=model.dtype == torch.float16)
            draws = torch.Generator("cpu").manual_seed(settings.seed)
            losses = []
            for step in range(settings.steps):
                t, noise = _draw(draws, latents, scheduler)
                loss = denoising_loss(model.unet, scheduler, latents, noise, t, context, layout)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
                progress(step + 1, settings.steps)
            loss_after = loss_on_clip()
            lora, config = _adapter_state(model)
    return TuneResult(lora, config, tuple(losses), loss_before, loss_after)


def clip_loss(model: VEModel, frames: torch.Tensor, prompt: str, seed: int = 0) -> float:
    """The denoising loss of `model` (with its LoRAs) on the clip at EVAL_TIMESTEPS, as `tune_on_clip` measures
    `loss_before` / `loss_after` with the same seed: a LoRA file loaded back gives its `loss_after`."""
    check_image_batch(frames, "frames", multiple_of=8)
    with torch.inference_mode(False):
        clip = frames.clone()
        count = clip.shape[0]
        latents = encode_frames(model, clip, list(itertools.islice(posterior_generators(seed), count)))
        context = encode_prompt(model, prompt).expand(count, -1, -1)
        layout = FrameLayout(count, tuple(range(count)), ("cond",))
        with lora_scope(model), attention_processors(model.unet, sparse_causal):
            return _clip_loss(model, latents, context, _noise_schedule(model), layout, seed)()


# --- the pieces ------------------------------------------------------------------------------------------------

def sparse_causal(name: str) -> VideoAttnProcessor:
    """Tune-A-Video's SC-Attn: self-attention reads [frame 0, frame i-1]; cross-attention per frame."""
    return VideoAttnProcessor(first_and_previous if is_self_attention(name) else own_frame, name)


def denoising_loss(unet, scheduler, latents, noise, t, context, layout) -> torch.Tensor:
    """MSE between the UNet's prediction on x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps and its target (eps,
    or the velocity for v-prediction models), in fp32."""
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    pred = unet(noisy, t, encoder_hidden_states=context, cross_attention_kwargs={"layout": layout}).sample
    return F.mse_loss(pred.float(), target.float())


def _noise_schedule(model: VEModel):
    """The training noise schedule of the model (DDPM with the model's betas and prediction type)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(model.scheduler_config)


def _draw(generator: torch.Generator, latents: torch.Tensor, scheduler) -> tuple:
    """One timestep for the whole clip and noise for every frame, drawn on the CPU so a seed gives the same
    draws on every device."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    return t.expand(latents.shape[0]).to(latents.device), noise.to(latents.device, latents.dtype)


def _clip_loss(model, latents, context, scheduler, layout, seed: int):
    """A function giving the mean denoising loss at EVAL_TIMESTEPS with noise fixed by `seed` (not the training
    draws): the same measure before and after tuning."""
    generator = torch.Generator("cpu").manual_seed(seed + 1)
    draws = [(torch.full((latents.shape[0],), t, device=latents.device),
              torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype))
             for t in EVAL_TIMESTEPS]

    @torch.no_grad()
    def measure() -> float:
        losses = [denoising_loss(model.unet, scheduler, latents, noise, t, context, layout) for t, noise in draws]
        return float(torch.stack(losses).mean())

    return measure


@contextmanager
def autograd_weights(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block `module` computes with normal-tensor copies of those of its weights that are inference
    tensors (a model loaded under ComfyUI's inference_mode has only such weights, and autograd cannot save an
    inference tensor for backward); the original tensors are put back on exit, untouched. Swapped for the whole
    block, not per call: gradient checkpointing recomputes the forward pass inside `backward()`. Costs one copy
    of the swapped weights (enter inside inference_mode(False), or the copies are inference tensors too)."""
    swapped = []
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None and tensor.is_inference():
                    copy = tensor.clone()
                    if isinstance(tensor, torch.nn.Parameter):
                        copy = torch.nn.Parameter(copy, requires_grad=False)
                    store[name] = copy
                    swapped.append((store, name, tensor))
    try:
        yield
    finally:
        for store, name, tensor in reversed(swapped):
            store[name] = tensor


@contextmanager
def query_lora(model: VEModel, settings: TuneSettings) -> Iterator[list]:
    """A trainable LoRA adapter on QUERY_LAYERS of the UNet, active beside the model's own LoRAs (enter inside
    their `lora_scope`, whose exit removes the adapter again); yields its parameters, the only ones with grads.

    The LoRA's A matrices are initialised from `settings.seed` (peft draws them from the global generator,
    which is forked so nothing else sees the draw), B is zero: tuning starts at the base model.
    """
    from peft import LoraConfig

    unet = model.unet
    config = LoraConfig(r=settings.rank, lora_alpha=settings.rank, target_modules=list(QUERY_LAYERS),
                        init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        unet.add_adapter(config, adapter_name=ADAPTER)  # makes ADAPTER the only active one
    _activate_with(unet, adapter_weights(model.loras))
    unet.requires_grad_(False)
    params = []
    for name, param in unet.named_parameters():
        if f".{ADAPTER}." in name:
            param.data = param.data.float()  # fp32 updates also on an fp16 model (peft casts its input)
            param.requires_grad_(True)
            params.append(param)
    try:
        yield params
    finally:
        for param in params:
            param.requires_grad_(False)


def _activate_with(unet, weights: dict) -> None:
    """Every layer runs the model's own LoRAs at their strengths and the tuned adapter at 1."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in (m for m in unet.modules() if isinstance(m, BaseTunerLayer)):
        names = [name for name in (*weights, ADAPTER) if name in layer.scaling]
        layer.enable_adapters(bool(names))
        if names:
            layer.set_adapter(names)
            for name in weights:
                if name in layer.scaling:
                    layer.set_scale(name, weights[name])


@contextmanager
def checkpointing(unet, settings: TuneSettings) -> Iterator[None]:
    """diffusers' gradient checkpointing for the duration of tuning (recompute each block in the backward pass
    instead of keeping its activations), if asked; the UNet is handed back as it was."""
    was = unet.is_gradient_checkpointing
    if settings.gradient_checkpointing and not was:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if settings.gradient_checkpointing and not was:
            unet.disable_gradient_checkpointing()


def _adapter_state(model: VEModel) -> tuple:
    """The tuned adapter as diffusers saves it: `unet.`-prefixed peft keys (CPU, fp32) and its LoraConfig."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model.unet, adapter_name=ADAPTER)
    lora = {f"unet.{key}": value.detach().float().cpu().clone() for key, value in state.items()}
    config = model.unet.peft_config[ADAPTER].to_dict()
    return lora, config


# --- the file --------------------------------------------------------------------------------------------------

def save_lora(result: TuneResult, directory: str, filename_prefix: str) -> Path:
    """Write the LoRA as `<directory>/<prefix>_NNNNN.safetensors` with the next free number (never overwriting),
    in diffusers' layout with its adapter config in the header (as `save_lora_weights` writes it).

    The numbered name is reserved first (an empty file, created exclusively); the LoRA is written beside it as a
    hidden `.part` file and renamed onto it when complete, so no half-written LoRA is ever under the name.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    path = reserve_output_path(directory, filename_prefix, "safetensors")
    part = path.with_name(f".{path.name}.part.safetensors")
    try:
        state = {key.removeprefix("unet."): value for key, value in result.lora.items()}
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            str(path.parent), unet_lora_layers=state, unet_lora_adapter_metadata=_json_safe(result.config),
            weight_name=part.name, safe_serialization=True)
        os.chmod(part, path.stat().st_mode & 0o777)  # safetensors creates 0600; keep the umask's mode, as open() does
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    return path


def _json_safe(config: dict) -> dict:
    """LoraConfig.to_dict() holds sets (target_modules); the header is JSON."""
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


# --- memory ----------------------------------------------------------------------------------------------------

def tuning_step_bytes(unet_config: dict, frames: int, latent_size: tuple, dtype: torch.dtype = torch.float16,
                      rank: int = 4, gradient_checkpointing: bool = True, text_tokens: int = 77) -> dict:
    """Peak bytes of one tuning step (forward and backward of a UNet with this config, the query LoRA and
    sparse-causal attention, on `frames` latents of (h, w)), counted on fake tensors by torch's MemTracker: no
    memory is used and nothing is computed. Returns {category: bytes, ..., "Total": bytes} at the peak
    (weights, gradients, activations, temporaries; the frozen weights count as buffers). The optimiser's state
    (2 x the LoRA's 0.2 M parameters in fp32 for SD-1.5, under 2 MB) is not in it."""
    from diffusers import UNet2DConditionModel
    from torch.distributed._tools.mem_tracker import MemTracker

    from ..sampling.budget import fake_model, fake_tensors

    layout = FrameLayout(frames, tuple(range(frames)), ("cond",))
    with fake_tensors():
        unet = fake_model(UNet2DConditionModel, unet_config, dtype)
        _freeze_as_buffers(unet)  # MemTracker hooks the grads of every parameter: frozen ones must not be any
        for name, module in list(unet.named_modules()):
            if name.endswith(QUERY_LAYERS):
                parent, _, child = name.rpartition(".")
                setattr(unet.get_submodule(parent), child, _CountedLowRank(module, rank))
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        sample = torch.empty(frames, unet_config["in_channels"], *latent_size, dtype=dtype)
        context = torch.empty(frames, text_tokens, unet_config["cross_attention_dim"], dtype=dtype)
        tracker = MemTracker()
        tracker.track_external(unet)
        with attention_processors(unet, sparse_causal), tracker, torch.enable_grad():
            pred = unet(sample, 999, encoder_hidden_states=context, cross_attention_kwargs={"layout": layout}).sample
            F.mse_loss(pred.float(), sample.float()).backward()
        peak = tracker.get_tracker_snapshot("peak")
    totals: dict = {}
    for stats in peak.values():
        for kind, value in stats.items():
            key = str(getattr(kind, "value", kind))
            totals[key] = totals.get(key, 0) + int(value)
    return totals


class _CountedLowRank(torch.nn.Module):
    """What peft's LoRA Linear computes in training, for the fake count only (peft cannot move its new layers
    onto fake tensors): base(x) + B(A(x)) with A, B in fp32 and the input cast to fp32, as peft casts it."""

    def __init__(self, base: torch.nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False, dtype=torch.float32)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False, dtype=torch.float32)

    def forward(self, x):
        out = self.base(x)
        return (out + self.lora_B(self.lora_A(x.float()))).to(out.dtype)


def _freeze_as_buffers(module: torch.nn.Module) -> None:
    """Every parameter of `module` becomes a buffer of the same tensor: the frozen base weights of tuning, which
    take no gradient (MemTracker then counts them as buffers)."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach())
