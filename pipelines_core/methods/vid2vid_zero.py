"""vid2vid-zero (Wang et al., 2023, "Zero-Shot Video Editing Using Off-The-Shelf Image Diffusion Models") as an
injection: what the method adds on top of null-text inversion (DDIM Invert's `null_text`).

  * Spatial-temporal self-attention. Every frame's self-attention reads the keys and values of all frames
    (the paper's bidirectional dense spatial-temporal attention, methods.md §1.7): the rule `all`, on both
    the source and the edit (DDIM Invert must invert under `all` too, so that null-text inversion fits the
    embeddings under the attention the edit samples with). `st_attention="code"` is instead what the official
    code's configs run (`use_sc_attn: True, use_st_attn: True, st_attn_idx: 0`): dense attention only in
    down_blocks.0 (the code's down index 0), the mid block and up_blocks.1 (its up index i - 1 == 0), and
    sparse-causal [first, previous] in every other self-attention layer. That mix has no single DDIM Invert
    rule; the code itself inverts frame by frame (`normal_infer=True`).
  * Cross-attention guidance (the paper's "cross-attention guidance", the code's prompt-to-prompt
    controller): the edit's cross-attention maps are replaced by the source's, on the conditional CFG half,
    for the first `cross_replace` of the steps (p2p's alpha table: steps i < int(cross_replace * (N + 1))).
    The code picks p2p Replace when the two prompts have the same number of words, else Refine (`mode`
    "auto"); Replace maps word i onto word i, Refine keeps the maps of words new in the target
    (prompt_to_prompt.py). The source maps are those of a live source branch in the same UNet call
    ([source, uncond, cond]): the inverted latent x_t under the source prompt, under the same cross-frame
    attention. In the code the source is a second sample in the batch that re-generates the source from
    x_T under CFG with the null-text embeddings; with null-text inversion that sample follows the inverted
    trajectory, so reading the inverted x_t gives its maps without a fourth chunk.
  * Null-text schedule (`null_uncond_ratio`, the code's default -0.5): the optimised unconditional
    embeddings are used only on some steps, the plain empty prompt's on the others: ratio r > 0 uses them
    for steps i <= r * N, r < 0 for steps i >= (1 + r) * N (-0.5: the second half), r = 1 on every step.

Where this differs from the code, on purpose or by the pack's design:
  * self_replace (0.4 in the code) is not implemented: the code's `register_attention_control` hooks only
    modules of class `CrossAttention`, and with sc/st attention every self-attention is a
    `SparseCausalAttention` or `SpatialTemporalAttention`, so self-attention replacement never runs there.
  * The code's Refine branch passes self_replace_steps (0.4) as cross_replace_steps (a bug, methods.md §1.7);
    here `cross_replace` applies to both modes (0.8 by default; set 0.4 to match the code's Refine).
  * DDIM Invert inverts under the source prompt (the code inverts with the empty prompt,
    `null_inv_with_prompt=False`), and its null-text inversion runs 10 inner steps at lr 1e-2 (the code: 1
    inner step, lr 1e-2 * (1 - i/100)).
  * SD-1.5 (or any diffusers UNet) in place of the paper's SD-1.4; the block names of `st_attention="code"` are
    SD's, and on other UNets name the same positions (first down block, mid block, second up block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from ..attention.attach import is_self_attention
from ..attention.processor import AttnCall, AttnEdit
from ..attention.rules import Rule, all_frames, first_and_previous
from ..attention.store import cond_rows
from ..models.model import encode_prompt
from ..sampling.injection import Injection, InjectionPlan, PlanContext
from . import prompt_to_prompt as p2p
from .fatezero import cross_fusion_steps, refine_maps, replace_maps, source_rows

ATTENTION = ("all", "code")  # dense everywhere (the paper), or the official configs' dense + sparse-causal mix
MODES = ("auto", "replace", "refine")
# st_attention="code": the blocks the code builds with SpatialTemporalAttention (st_attn_idx 0); SD's names.
DENSE_BLOCKS = ("down_blocks.0.", "mid_block.", "up_blocks.1.")


@dataclass(frozen=True)
class Vid2VidZeroParams:
    """The injector's settings; defaults are vid2vid-zero's (configs/car-turn.yaml, test_vid2vid_zero.py)."""

    st_attention: str = "all"  # "all": every self-attention reads all frames; "code": the configs' mix
    cross_replace: float = 0.8  # cross_replace_steps: the edit reads the source's cross-attention maps this long
    mode: str = "auto"  # p2p Replace when the prompts have the same word count, else Refine
    null_uncond_ratio: float = -0.5  # null-text embeddings on the second half of the steps (1: on every step)
    source_prompt: str = ""  # the prompt of the source maps; empty: the inversion's prompt

    def check(self) -> None:
        if self.st_attention not in ATTENTION:
            raise ValueError(f"vid2vid-zero st_attention {self.st_attention!r} is unknown; "
                             f"choose one of {', '.join(ATTENTION)}")
        if not 0.0 <= self.cross_replace <= 1.0:
            raise ValueError(f"vid2vid-zero cross_replace must be a fraction of the steps in [0, 1] "
                             f"(got {self.cross_replace})")
        if self.mode not in MODES:
            raise ValueError(f"vid2vid-zero mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if not -1.0 <= self.null_uncond_ratio <= 1.0:
            raise ValueError(f"vid2vid-zero null_uncond_ratio must be in [-1, 1] (got {self.null_uncond_ratio}); "
                             "1 uses the null-text embeddings on every step")


def vid2vid_zero_injection(inversion, params: Vid2VidZeroParams = Vid2VidZeroParams()) -> Injection:
    """VE_INJECTION for vid2vid-zero, reading a null-text `inversion` (its latents and embeddings)."""
    params.check()
    if inversion is None or inversion.null_embeds is None:
        raise ValueError("vid2vid-zero reconstructs the source with null-text inversion: turn on DDIM Invert's "
                         "null_text (with null_text_cfg set to the sampler's cfg)")
    if params.st_attention == "all" and inversion.attention != "all":
        raise ValueError(f"vid2vid-zero st_attention 'all': DDIM Invert ran with attention {inversion.attention!r}; "
                         "set its attention to 'all' so null-text inversion fits the attention the edit uses")
    frames = inversion.latents[0].shape[0]
    if params.st_attention == "all" and inversion.chunk_size < frames:
        raise ValueError(f"vid2vid-zero st_attention 'all': DDIM Invert's chunk_size {inversion.chunk_size} splits the "
                         f"{frames} frames; set it to at least the frame count")
    return Injection("vid2vid-zero", inversion, params, plan_vid2vid_zero)


# --- the pieces ------------------------------------------------------------------------------------------

def uses_null_text(index: int, steps: int, ratio: float) -> bool:
    """Whether step `index` of `steps` uses the null-text embedding (the code's `use_uncond_this_step`)."""
    if ratio > 0:
        return not index > steps * ratio
    return not index < steps * (1 + ratio)


def self_attention_rule(name: str, attention: str) -> Optional[Rule]:
    """The rule of a layer: None for cross-attention (left to the sampler, which never changes it)."""
    if not is_self_attention(name):
        return None
    if attention == "all" or name.startswith(DENSE_BLOCKS):
        return all_frames
    return first_and_previous  # the code's SparseCausalAttention: keys of [frame 0, frame i - 1]


def same_word_count(source: str, target: str) -> bool:
    """The code's choice of controller: as many words -> AttentionReplace. (The code splits on single spaces; runs
    of whitespace count as one separator here, as prompt_to_prompt.replacement counts words.)"""
    return len(source.split()) == len(target.split())


class CrossAttentionGuidance(AttnEdit):
    """p2p on the conditional rows of every cross-attention call for steps < `steps`: the edit's maps become
    the source branch's maps, re-indexed for the target prompt (Replace) or blended per token (Refine)."""

    def __init__(self, steps: int, replace_matrix: Optional[Tensor] = None, mapper: Optional[Tensor] = None,
                 alphas: Optional[Tensor] = None):
        self.steps = steps
        self.replace_matrix, self.mapper, self.alphas = replace_matrix, mapper, alphas

    def wants_probs(self, call: AttnCall) -> bool:
        # Outside the window the call keeps the fused kernel (the explicit softmax path rounds differently).
        return not call.is_self and call.layout is not None and call.layout.step is not None \
            and call.layout.step < self.steps

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        if not self.wants_probs(call):
            return p
        batch = p.shape[0]
        rows, source = cond_rows(call.layout, batch), p[source_rows(call.layout, batch)]
        if self.replace_matrix is not None:
            fused = replace_maps(source, self.replace_matrix.to(p.device, p.dtype))
        else:
            fused = refine_maps(source, p[rows], self.mapper.to(p.device), self.alphas.to(p.device, p.dtype))
        p = p.clone()
        p[rows] = fused  # p2p alpha = 1 inside the window
        return p


# --- the plan ------------------------------------------------------------------------------------------

def plan_vid2vid_zero(injection: Injection, context: PlanContext) -> InjectionPlan:
    params: Vid2VidZeroParams = injection.params
    inversion = injection.inversion
    frames = inversion.latents[0].shape[0]
    if context.frame_count != frames:
        raise ValueError(f"vid2vid-zero: the sampler has {context.frame_count} frames but DDIM Invert {frames}")
    if context.chunk_size < frames:
        raise ValueError("vid2vid-zero's spatial-temporal attention reads every frame: set the Cross-Frame "
                         f"Sampler's chunk_size to at least the frame count ({frames})")
    if context.cfg != inversion.cfg:
        raise ValueError(f"vid2vid-zero: the null-text embeddings were fitted for cfg {inversion.cfg} but the "
                         f"sampler runs cfg {context.cfg}: set DDIM Invert's null_text_cfg to the sampler's cfg")

    cross_steps = cross_fusion_steps(params.cross_replace, context.steps)
    guidance = guidance_edit(params, inversion.prompt, context, cross_steps) if cross_steps > 0 else None

    def edits_for(name: str):
        return (guidance,) if guidance is not None and not is_self_attention(name) else ()

    plain = encode_prompt(context.model, "")  # the code's `_encode_prompt('')` on steps without null-text

    def wrap_denoiser(denoiser):
        null = denoiser.uncond  # the sampler set the inversion's per-timestep embeddings
        if isinstance(null, dict):
            steps = len(context.timesteps)
            denoiser.uncond = {t: null[t] if uses_null_text(i, steps, params.null_uncond_ratio) else plain
                               for i, t in enumerate(context.timesteps)}
        return denoiser

    return InjectionPlan(edits_for=edits_for, rule_for=lambda name: self_attention_rule(name, params.st_attention),
                         source_branch=guidance is not None, wrap_denoiser=wrap_denoiser)


def guidance_edit(params: Vid2VidZeroParams, inversion_prompt: str, context: PlanContext,
                  steps: int) -> CrossAttentionGuidance:
    tokenizer, n = context.model.tokenizer, int(context.model.tokenizer.model_max_length)
    source, target = params.source_prompt or inversion_prompt, context.target_prompt
    mode = params.mode if params.mode != "auto" else ("replace" if same_word_count(source, target) else "refine")
    try:
        if mode == "replace":
            return CrossAttentionGuidance(steps, replace_matrix=p2p.replacement(tokenizer, source, target, n))
        mapper, alphas = p2p.refinement(tokenizer, source, target, n)
        return CrossAttentionGuidance(steps, mapper=mapper, alphas=alphas)
    except ValueError as error:
        raise ValueError(f"vid2vid-zero mode {mode!r}: {error}") from None
