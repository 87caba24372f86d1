"""FateZero (Qi et al., ICCV 2023): edit a video by fusing the attention of its source into the edit.

Where the source attention comes from (`FateZeroParams.source`):

* "stored" (the paper, exactly): DDIM Invert records, at every timestep t, the attention probabilities
  of every layer with at most `max_tokens` queries (FateZero: 32x32; the 64x64 level is skipped for
  memory). The sampling step with timestep t reads what the inversion step with timestep t recorded
  (FateZero's `len(store) - cur_step - 1`: aligned by timestep): maps of the UNet at x_{t-1} with
  timestep t. For 8 frames at 512x512 and 50 steps that is 36 GiB (one key frame) to 69 GiB
  (first+previous) of fp16 maps.
* "live" (the default): DDIM Invert keeps the latents only, and the sampler's UNet batch carries a live
  source branch, [source, uncond, cond]: the inverted latent x_t under the source prompt. The source
  maps are the source chunk's rows of the same attention call (same layer, step, frames and
  cross-frame rule), so nothing is stored; the cost is a third chunk in every UNet call (~1.5x the
  UNet compute of CFG's two). They differ from the paper's in one point: they are computed at x_t with
  timestep t during sampling, not at x_{t-1} with timestep t during inversion (a source branch fed
  x_{t-1} reproduces the stored result). Every cond row of a chunk is fused (context frames too: their
  source rows sit at the same positions).

Sampling from x_T with the target prompt, on the conditional CFG half only (FateZero edits
`attn[h // 2:]`):

* self-attention fusion, steps i < int(self_replace * N): A = M*A_edit + (1 - M)*A_src, with the
  blend mask M of the source prompt's blend words (FateZero's MaskBlend); no blend words -> M = 0;
* cross-attention prompt-to-prompt, steps i < int(cross_replace * (N + 1)) (p2p's alpha table has
  N + 1 rows): new = alpha*fused(A_src) + (1 - alpha)*A_tgt, alpha = 1 inside the window, with
  fused = Refine or Replace (prompt_to_prompt.py), times the equalizer when one is given;
* latent blend after the step (FateZero's LatentBlend, only with blend words), while
  int(start*N) < i + 1 < int(end*N): x <- x_src + M_union*(x - x_src), M_union the union of the source
  words' mask (stored: inverted maps at t; live: the source branch's maps of this step) and the target
  words' mask (this run's own maps, summed over the steps so far); with `blend_frames` "sparse_causal"
  each frame's M_union is joined with those of the first and the previous frame (Edit-A-Video's
  sparse-causal blending, edit_a_video.py).

Blend mask (FateZero `get_mask`): cross-attention maps of the blend words at the 16x16 level of SD-1.5
(`down_cross[2:4] + up_cross[:3]`), summed over the words' tokens, averaged over heads and layers,
3x3 max-pooled, resized (nearest) to where it is used, divided by each frame's maximum, `> blend_th`.
The 16x16 level is the coarsest one with attention in SD-1.5's down and up blocks (the 8x8 mid block
excluded); on other UNets (the builtin tiny one) that same rule picks the analogous level.

Blend mask with a live source: one UNet call has all the source's mask-level maps only after its last
mask layer (SD-1.5: up_blocks.1.attentions.2), when every encoder, mid and 16x16 decoder self-attention
layer has already run. Each self-attention layer therefore takes the mask of the latest step whose
mask-level maps of its frames are complete: the current step for the layers after the mask level in
the call (SD-1.5: the 32x32 decoder layers, up_blocks.2), the previous step for those before it. At
the first step, before the mask level, no maps exist yet and the mask is that of a uniform map: M = 1
(the edit's own maps) for blend_th < 1, M = 0 for blend_th >= 1, so the thresholds' meaning (C5) holds
at every step. The latent blend's source mask uses the current step's live maps (complete after the
step).

Stored maps: the self-attention keys are the frames the inversion's cross-frame rule gathered, chunk by
chunk, so sampling must use the same rule and chunking (checked; see `check_same_attention`). Only the
frames a chunk keeps are fused; context frames lent to a later chunk keep their own maps, as they had
in the inversion.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention.processor import AttnCall, AttnEdit
from ..attention.store import attention_layers, cond_rows
from ..sampling.chunks import plan_chunks
from ..sampling.hooks import Hooks, StepState
from ..sampling.injection import Injection, InjectionPlan, PlanContext
from . import prompt_to_prompt as p2p
from .edit_a_video import SPARSE_CAUSAL, sparse_causal_union

MODES = ("refine", "replace")
SOURCES = ("live", "stored")  # source maps: the live source branch, or maps recorded by DDIM Invert
BLEND_FRAMES = ("own", SPARSE_CAUSAL)  # the latent blend's mask of frame i: its own, or joined with frames 0 and i-1
BLEND_POOL = 3  # FateZero's get_mask: k = 1 -> a 3x3 max-pool
CHECK_FIX = "the Cross-Frame Sampler's attention, attention_layers 'all' and chunk_size must match DDIM Invert's"


@dataclass(frozen=True)
class FateZeroParams:
    """The Attention Injector's FateZero settings; defaults are FateZero's (docs/EditingGuidance.md, configs)."""

    cross_replace: float = 0.8  # cross_replace_steps: p2p cross-attention fusion for this fraction of steps
    self_replace: float = 0.8  # self_replace_steps: 0.8 for style edits, 0.5 for shape edits
    mode: str = "refine"  # is_replace_controller False: Refine (style); "replace": same word count (objects)
    blend_words: tuple = ()  # blend_words[0]: source-prompt words whose maps give the blend mask M
    target_blend_words: tuple = ()  # blend_words[1]: target-prompt words (latent blend's target mask)
    blend_th: float = 0.3  # bend_th: M = normalised map > blend_th
    equalizer_words: tuple = ()  # eq_params.words: target-prompt words whose maps are scaled
    equalizer_values: tuple = ()  # eq_params.values, e.g. (10,) for "watercolor"
    latent_blend: Optional[tuple] = (0.2, 0.8)  # LatentBlend start_blend/end_blend; needs blend words; None: off
    max_tokens: int = 32 * 32  # only layers with at most this many queries are fused (all recorded ones)
    source_prompt: str = ""  # the prompt the recorded maps belong to; empty: the inversion's prompt
    source: str = "live"  # "live": a source branch in the UNet batch, latents-only inversion; "stored": recorded maps
    blend_frames: str = "own"  # "sparse_causal": Edit-A-Video's blending (latent blend masks joined across frames)

    def check(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown FateZero source {self.source!r}; choose one of {', '.join(SOURCES)}")
        for name in ("cross_replace", "self_replace"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FateZero {name} must be a fraction of the steps in [0, 1] (got {getattr(self, name)})")
        if self.mode not in MODES:
            raise ValueError(f"unknown FateZero mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if len(self.equalizer_words) != len(self.equalizer_values):
            raise ValueError("FateZero equalizer: give one value per equalizer word")
        if self.latent_blend is not None and not 0.0 <= self.latent_blend[0] <= self.latent_blend[1] <= 1.0:
            raise ValueError(f"FateZero latent_blend window {self.latent_blend} must be (start, end) with 0 <= start <= end <= 1")
        if self.blend_frames not in BLEND_FRAMES:
            raise ValueError(f"unknown FateZero blend_frames {self.blend_frames!r}; "
                             f"choose one of {', '.join(BLEND_FRAMES)}")
        if self.blend_frames == SPARSE_CAUSAL and (not self.blend_words or self.latent_blend is None):
            raise ValueError("sparse-causal blending joins the latent blend's masks across frames: give blend_words "
                             "(source-prompt words of the edited object) and a latent_blend window")
        if self.max_tokens < 1:
            raise ValueError(f"FateZero max_tokens must be at least 1 (got {self.max_tokens})")
        for name in ("blend_words", "target_blend_words", "equalizer_words"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"FateZero {name} must be a tuple of words, e.g. ('car',)")


def comma_words(text: str) -> tuple:
    """Words written comma-separated, as a node's text field holds them: "car, red car" -> ("car", "red car")."""
    return tuple(w.strip() for w in text.split(",") if w.strip())


def comma_numbers(text: str, name: str = "equalizer_values") -> tuple:
    try:
        return tuple(float(v) for v in comma_words(text))
    except ValueError:
        raise ValueError(f"FateZero {name} must be numbers separated by commas (got {text!r})") from None


def fatezero_injection(inversion, params: FateZeroParams = FateZeroParams(),
                       source_prompt: Optional[str] = None) -> Injection:
    """VE_INJECTION for FateZero, reading `inversion`: its latents ("live"), or the self_probs and
    cross_probs DDIM Invert recorded ("stored")."""
    if source_prompt is not None:
        params = replace(params, source_prompt=source_prompt)
    params.check()
    return Injection("fatezero", inversion, params, plan_fatezero)


def plan_fatezero(injection: Injection, context: PlanContext) -> InjectionPlan:
    """Planner: fresh per-run state for every plan; the Injection itself is never changed."""
    return FateZeroRun(injection.inversion, injection.params, context).plan()


# --- the math --------------------------------------------------------------------------------------

def fuse_self_attention(edit: Tensor, source: Tensor, mask: Optional[Tensor]) -> Tensor:
    """FateZero eq. (5): M*A_edit + (1 - M)*A_src; no mask means M = 0, the source maps as they are."""
    return source if mask is None else mask * edit + (1 - mask) * source


def refine_maps(source: Tensor, target: Tensor, mapper: Tensor, alphas: Tensor) -> Tensor:
    """p2p Refine: aligned target tokens read their source token's map, new tokens keep their own."""
    return source[..., mapper] * alphas + target * (1 - alphas)


def replace_maps(source: Tensor, matrix: Tensor) -> Tensor:
    """p2p Replace: maps over target tokens = source maps (..., source tokens) @ (source, target) matrix."""
    return source @ matrix


def word_map(maps: Sequence[Tensor], positions: Sequence[int], grid: tuple) -> Tensor:
    """(F, h, w): cross-attention of the given tokens, summed over them, averaged over heads and layers.

    maps: per layer (F, heads, h*w, text tokens), all at one resolution.
    """
    per_head = torch.cat([m[..., list(positions)].float().sum(-1) for m in maps], dim=1)  # F, heads*layers, N
    return per_head.mean(1).unflatten(-1, grid)


def blend_mask(word_maps: Tensor, size: tuple, threshold: float) -> Tensor:
    """FateZero's get_mask: 3x3 max-pool, nearest resize to `size`, divide by each frame's max, > threshold.

    word_maps (F, h, w) -> bool (F, *size).
    """
    pooled = F.max_pool2d(word_maps[:, None], BLEND_POOL, stride=1, padding=BLEND_POOL // 2)
    resized = F.interpolate(pooled, size=tuple(size))
    normalised = resized / resized.amax(dim=(-2, -1), keepdim=True)
    return (normalised > threshold)[:, 0]


def token_grid(tokens: int, latent_size: tuple) -> tuple:
    """(h, w) of an attention layer with `tokens` queries: the latent size halved (stride-2, padded) level by level."""
    h, w = latent_size
    while h * w > tokens and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise ValueError(f"an attention layer with {tokens} tokens does not fit a {latent_size} latent")
    return h, w


# --- windows -----------------------------------------------------------------------------------------

def self_fusion_steps(fraction: float, steps: int) -> int:
    """FateZero `num_self_replace = int(num_steps * self_replace_steps)`: steps 0 .. n-1 are fused."""
    return int(fraction * steps)


def cross_fusion_steps(fraction: float, steps: int) -> int:
    """p2p `get_time_words_attention_alpha`: the alpha table has steps + 1 rows, alpha = 1 on the first
    int(fraction * (steps + 1)) of them."""
    return int(fraction * (steps + 1))


def latent_blend_active(index: int, steps: int, window: tuple) -> bool:
    """FateZero LatentBlend: after step `index` its counter is index + 1, blending while
    int(start * N) < counter < int(end * N) (both ends open: steps 10-38 of 50 for (0.2, 0.8))."""
    return int(window[0] * steps) < index + 1 < int(window[1] * steps)


# --- compatibility of the recording with the run -------------------------------------------------------

def check_same_attention(inversion, attention: str, chunk_size: int, attention_layers: str = "all") -> None:
    """The stored self-attention keys are the frames DDIM Invert's rule gathered chunk by chunk: the
    sampler must gather the same ones."""
    frames = inversion.latents[0].shape[0]
    same_chunks = plan_chunks(frames, chunk_size, attention) == plan_chunks(frames, inversion.chunk_size, inversion.attention)
    same_layers = attention_layers == "all" or attention == "none"
    if attention != inversion.attention or not same_chunks or not same_layers:
        raise ValueError(incompatible_message(inversion, f"attention {attention!r}, attention_layers "
                                                         f"{attention_layers!r}, chunk_size {chunk_size}"))


def incompatible_message(inversion, sampler: str) -> str:
    return (f"FateZero: DDIM Invert recorded with attention {inversion.attention!r}, chunk_size "
            f"{inversion.chunk_size} but the Cross-Frame Sampler runs {sampler}; {CHECK_FIX}")


@contextmanager
def _named(setting: str) -> Iterator[None]:
    """Prefix a prompt/word error with the FateZero setting it came from."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"FateZero {setting}: {error}") from None


# --- layers --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    name: str  # processor key
    is_self: bool
    grid: tuple  # (h, w) of its queries


def fused_layers(unet, latent_size: tuple, max_tokens: int) -> dict[str, Layer]:
    """The attention layers FateZero touches: those with at most `max_tokens` queries (its store's
    `attn.shape[-2] <= 32 ** 2`); larger ones keep the fused kernel and are never changed."""
    h, w = (8 * s for s in latent_size)
    return {a.name: Layer(a.name, a.is_self, token_grid(a.tokens, latent_size))
            for a in attention_layers(unet, h, w) if a.tokens <= max_tokens}


def mask_level(layers: Iterable[Layer]) -> list[Layer]:
    """Cross-attention layers the blend mask reads: the coarsest level of the down and up blocks (the
    mid block left out). On SD-1.5 these are FateZero's five 16x16 maps, down_cross[2:4] + up_cross[:3]."""
    cross = [l for l in layers if not l.is_self]
    outside_mid = [l for l in cross if not l.name.startswith("mid_block")] or cross
    if not outside_mid:
        return []
    coarsest = min(l.grid[0] * l.grid[1] for l in outside_mid)
    return [l for l in outside_mid if l.grid[0] * l.grid[1] == coarsest]


# --- the live source branch -------------------------------------------------------------------------------

def source_rows(layout, batch: int) -> slice:
    """Rows of the live source chunk in a (chunk, frame) batch."""
    if layout is None or "source" not in layout.roles:
        raise ValueError("FateZero source 'live' needs the sampler's source branch in the UNet batch")
    return layout.rows("source", batch)


class LiveWordMaps:
    """The source branch's blend-word maps on the mask layers, for the current and the previous step.

    A frame's first maps in a step count: chunks run in order, so a frame lent as context to a later
    chunk keeps those of the chunk that keeps it.
    """

    def __init__(self, layers: Sequence[Layer], frames: int, words: Sequence[int]):
        self.layers = [l.name for l in layers]
        self.grid = layers[0].grid if layers else None
        self.frames, self.words = frames, list(words)
        self.sums: dict[int, dict[str, Tensor]] = {}  # step -> layer -> (F, heads, N) summed over the words
        self.filled: dict[int, dict[str, Tensor]] = {}  # step -> layer -> (F,) which frames have maps

    def add(self, step: int, layer: str, frame_ids: Sequence[int], maps: Tensor) -> None:
        """maps: (n, heads, N, text tokens), the source rows of frames `frame_ids`."""
        for old in [s for s in self.sums if s < step - 1]:
            del self.sums[old], self.filled[old]
        words = maps[..., self.words].float().sum(-1)
        if layer not in self.sums.setdefault(step, {}):
            self.sums[step][layer] = words.new_zeros(self.frames, *words.shape[1:])
            self.filled.setdefault(step, {})[layer] = torch.zeros(self.frames, dtype=torch.bool, device=words.device)
        sums, filled = self.sums[step][layer], self.filled[step][layer]
        ids = torch.as_tensor(list(frame_ids), device=words.device)
        new = ~filled[ids]
        sums[ids[new]] = words[new]
        filled[ids[new]] = True

    def complete(self, step: int, frame_ids: Sequence[int]) -> bool:
        """Whether every mask layer has given maps for these frames in `step`."""
        filled = self.filled.get(step, {})
        return all(name in filled and bool(filled[name][list(frame_ids)].all()) for name in self.layers)

    def word_map(self, step: int, frame_ids: Sequence[int]) -> Tensor:
        """(n, h, w): as `word_map` of the inverted maps, from this step's live maps."""
        per_head = torch.cat([self.sums[step][name][list(frame_ids)] for name in self.layers], dim=1)
        return per_head.mean(1).unflatten(-1, self.grid)


# --- one run --------------------------------------------------------------------------------------------

class FateZeroRun:
    """The state of one sampling run: what to fuse where, the blend masks of the current step, the live
    source's blend-word maps, and the target prompt's cross-attention summed over the steps (for the
    latent blend)."""

    def __init__(self, inversion, params: FateZeroParams, context: PlanContext):
        params.check()
        self.inversion, self.params, self.context = inversion, params, context
        self.live = params.source == "live"
        self.store = inversion.store
        self.steps = context.steps
        latent = inversion.latents[0]
        self.frames, self.latent_size = latent.shape[0], tuple(latent.shape[-2:])
        self.layers = fused_layers(context.model.unet, self.latent_size, params.max_tokens)
        self.mask_layers = mask_level(self.layers.values())
        self.self_steps = self_fusion_steps(params.self_replace, self.steps)
        self.cross_steps = cross_fusion_steps(params.cross_replace, self.steps)
        self.blend = bool(params.blend_words) and params.latent_blend is not None
        self.blend_window = params.latent_blend if self.blend else (0.0, 0.0)
        self._check_context(context)
        self._check_recording()
        self._prepare_text(context)
        # Chunks as the maps were made (live: the sampler's; stored: the inversion's): batch frames ->
        # positions whose outputs the chunk keeps.
        chunking = (context.chunk_size, context.attention) if self.live else (inversion.chunk_size, inversion.attention)
        self.kept = {c.frames: c.keep for c in plan_chunks(self.frames, *chunking)}
        self.live_maps = LiveWordMaps(self.mask_layers, self.frames, self.source_words)
        self._source_map_at: Optional[tuple] = None  # (timestep, (F, h, w) source blend-word map)
        self._masks, self._masks_at = {}, None  # this step's self-attention masks by layer grid
        self.target_maps: dict[str, Tensor] = {}  # mask layer -> (F, heads, N), summed over steps

    # -- setup -------------------------------------------------------------------------------------
    def _check_context(self, context: PlanContext) -> None:
        if context.frame_count != self.frames:
            raise ValueError(f"FateZero: the sampler has {context.frame_count} frames but DDIM Invert {self.frames}")
        attention = getattr(context, "attention", None)
        if attention is not None and self.fuses_anything and not self.live:
            check_same_attention(self.inversion, attention, getattr(context, "chunk_size", self.inversion.chunk_size),
                                 getattr(context, "attention_layers", "all"))

    @property
    def fuses_anything(self) -> bool:
        return self.self_steps > 0 or self.cross_steps > 0 or self.blend

    def _needed_kinds(self) -> set:
        kinds = {"self_probs"} if self.self_steps > 0 else set()
        if self.cross_steps > 0 or self.params.blend_words:
            kinds.add("cross_probs")
        return kinds

    def _check_recording(self) -> None:
        kinds = self._needed_kinds()
        if self.live or not kinds or not self.layers:
            return
        if self.store is None:
            raise ValueError("FateZero needs attention recorded by DDIM Invert: turn on its self and cross "
                             "attention recording, or use source 'live'")
        recorded = self.inversion.record
        if self.params.max_tokens > recorded.max_tokens:
            raise ValueError(f"FateZero max_tokens {self.params.max_tokens} is above what DDIM Invert recorded "
                             f"({recorded.max_tokens}); lower it or record with a higher max_tokens")
        for kind, flag in (("self_probs", recorded.self_probs), ("cross_probs", recorded.cross_probs)):
            if kind in kinds and not flag:
                what = "self" if kind == "self_probs" else "cross"
                raise ValueError(f"FateZero needs DDIM Invert to record {what}-attention probabilities; turn it on")
        for t in self.context.timesteps:
            for layer in self.layers.values():
                kind = "self_probs" if layer.is_self else "cross_probs"
                if kind in kinds and (layer.name, t, kind) not in self.store:
                    raise ValueError(f"FateZero: DDIM Invert recorded nothing for {layer.name} at timestep {t}; "
                                     "invert with the sampler's steps and the same model")

    def _prepare_text(self, context: PlanContext) -> None:
        """Token alignment (prompt_to_prompt.py) of the source prompt (the recorded maps') and the target prompt."""
        tokenizer, n, params = context.model.tokenizer, int(context.model.tokenizer.model_max_length), self.params
        source, target = params.source_prompt or self.inversion.prompt, context.target_prompt
        self.text_len = n
        with _named("mode 'replace'" if params.mode == "replace" else "mode 'refine'"):
            if params.mode == "replace":
                self.replace_matrix = p2p.replacement(tokenizer, source, target, n)
            else:
                self.mapper, self.alphas = p2p.refinement(tokenizer, source, target, n)
        self.equalizer = None
        if params.equalizer_words:
            with _named("equalizer_words (target prompt)"):
                self.equalizer = p2p.word_equalizer(tokenizer, target, params.equalizer_words,
                                                    params.equalizer_values, n)
        with _named("blend_words (source prompt)"):
            self.source_words = p2p.word_positions(tokenizer, source, params.blend_words, n)
        with _named("target_blend_words (target prompt)"):
            self.target_words = p2p.word_positions(tokenizer, target, params.target_blend_words, n)

    # -- the plan ----------------------------------------------------------------------------------
    def plan(self) -> InjectionPlan:
        edits = {}
        for layer in self.layers.values():
            if layer.is_self and self.self_steps > 0:
                edits[layer.name] = (SelfAttentionFusion(self, layer),)
            elif not layer.is_self and (self.cross_steps > 0 or self.records_target(layer) or self.watches(layer)):
                edits[layer.name] = (CrossAttentionFusion(self, layer),)
        hooks = Hooks(after_step=[self.latent_blend]) if self.blend else Hooks()
        return InjectionPlan(edits_for=lambda name: edits.get(name, ()), hooks=hooks,
                             source_branch=self.live and bool(edits))

    # -- what an edit reads --------------------------------------------------------------------------
    def fusion_inputs(self, call: AttnCall, p: Tensor, kind: str) -> tuple:
        """(rows to fuse, their frame numbers, the source maps for them): live, every cond row and the
        source chunk's rows at the same positions; stored, the kept cond rows and the recorded maps."""
        if self.live:
            batch = p.shape[0]
            return cond_rows(call.layout, batch), list(call.layout.frame_ids), p[source_rows(call.layout, batch)]
        rows, frames = self.kept_rows(call, p.shape[0])
        source = self.source(call.name, call.layout.timestep, kind, frames, p)
        if source.shape[-1] != p.shape[-1]:
            keys = p.shape[-1] // p.shape[-2]
            raise ValueError(incompatible_message(self.inversion, f"a rule reading {keys} frame(s) per query"))
        return rows, frames, source

    def kept_rows(self, call: AttnCall, batch: int) -> tuple[list, list]:
        """Batch rows of the conditional half that the chunk keeps, and their frame numbers."""
        layout = call.layout
        keep = self.kept.get(tuple(layout.frame_ids)) if layout is not None else None
        if keep is None:
            raise ValueError(incompatible_message(self.inversion, f"chunks {layout.frame_ids if layout else None}"))
        start = cond_rows(layout, batch).start
        return [start + k for k in keep], [layout.frame_ids[k] for k in keep]

    def source(self, layer: str, timestep: int, kind: str, frames: list, like: Tensor) -> Tensor:
        return self.store.get(layer, timestep, kind)[frames].to(like.device, like.dtype)

    def source_word_map(self, timestep: int) -> Tensor:
        """(F, h, w) blend-word map of the inverted maps at this timestep, computed once per step."""
        if self._source_map_at is None or self._source_map_at[0] != timestep:
            maps = [self.store.get(l.name, timestep, "cross_probs") for l in self.mask_layers]
            self._source_map_at = (timestep, word_map(maps, self.source_words, self.mask_layers[0].grid))
        return self._source_map_at[1]

    def self_mask(self, timestep: int, grid: tuple, frames: list) -> Optional[Tensor]:
        """M for a self-attention layer of `grid`, shaped to broadcast over (frames, heads, queries, keys)."""
        if not self.source_words:
            return None  # no blend words: M = 0, full replacement by the source maps
        if self._masks_at != timestep:
            self._masks, self._masks_at = {}, timestep
        if grid not in self._masks:
            self._masks[grid] = blend_mask(self.source_word_map(timestep), grid, self.params.blend_th)
        return self._masks[grid][frames].flatten(1)[:, None, :, None]

    # -- the live source's blend mask ------------------------------------------------------------------
    @property
    def needs_source_maps(self) -> bool:
        return self.live and bool(self.source_words) and (self.self_steps > 0 or self.blend)

    def watches(self, layer: Layer) -> bool:
        """Whether this run keeps the source branch's blend-word maps of `layer` (a mask layer)."""
        return self.needs_source_maps and layer in self.mask_layers

    def watches_at(self, index: int) -> bool:
        """Steps whose maps a mask needs: self-fusion steps (this one's and the next's) and latent blends."""
        return index < self.self_steps or latent_blend_active(index, self.steps, self.blend_window)

    def live_self_mask(self, step: int, grid: tuple, frames: list) -> Optional[Tensor]:
        """M from the latest step whose live mask-level maps of `frames` are complete (this step's after
        the mask level, the previous step's before it); before any, a uniform map's (M = blend_th < 1)."""
        if not self.source_words:
            return None
        maps = self.live_maps
        at = step if maps.complete(step, frames) else step - 1
        words = maps.word_map(at, frames) if maps.complete(at, frames) else torch.ones(len(frames), *maps.grid)
        return blend_mask(words, grid, self.params.blend_th).flatten(1)[:, None, :, None]

    def source_blend_map(self, index: int, timestep: int) -> Tensor:
        """(F, h, w) source blend-word map for the latent blend after step `index`."""
        if self.live:  # on the CPU, like the stored maps and the target words' sums it is joined with
            return self.live_maps.word_map(index, range(self.frames)).cpu()
        return self.source_word_map(timestep)

    # -- latent blend -----------------------------------------------------------------------------------
    def records_target(self, layer: Layer) -> bool:
        """Whether this run sums the target words' maps of `layer` (a mask layer, with a latent blend)."""
        return self.blend and bool(self.target_words) and layer in self.mask_layers

    def add_target_maps(self, layer: str, frames: list, maps: Tensor) -> None:
        """Sum the target words' share of this step's maps (pre-fusion, as FateZero's store keeps them)."""
        words = maps[..., self.target_words].float().sum(-1).cpu()  # n, heads, N
        total = self.target_maps.setdefault(layer, torch.zeros(self.frames, *words.shape[1:]))
        total[frames] += words

    def records_target_at(self, index: int) -> bool:
        return self.blend and index + 1 < int(self.blend_window[1] * self.steps)

    def latent_blend(self, state: StepState) -> Tensor:
        """x <- x_src + M_union*(x - x_src) after the step, x_src the inverted latent at x's noise level.

        (FateZero reads `latents_store[N - cur_step]`, the inverted latent one level noisier than x; the
        latent at x's own level is used here.)
        """
        if not latent_blend_active(state.index, self.steps, self.blend_window):
            return state.latents
        union = blend_mask(self.source_blend_map(state.index, int(state.timestep)), self.latent_size,
                           self.params.blend_th)
        if self.target_words:
            summed = torch.cat([self.target_maps[l.name] for l in self.mask_layers], dim=1).mean(1)
            union = union | blend_mask(summed.unflatten(-1, self.mask_layers[0].grid), self.latent_size,
                                       self.params.blend_th)
        if self.params.blend_frames == SPARSE_CAUSAL:  # the whole clip's masks, in frame order
            union = sparse_causal_union(union)
        x = state.latents
        x_src = self.inversion.latents[self.next_level(state.index)].to(x.device, x.dtype)
        return x_src + union[:, None].to(x.device, x.dtype) * (x - x_src)

    def next_level(self, index: int) -> int:
        timesteps = self.context.timesteps
        return int(timesteps[index + 1]) if index + 1 < len(timesteps) else 0


# --- the attention edits --------------------------------------------------------------------------------

class SelfAttentionFusion(AttnEdit):
    """A_self = M*A_edit + (1 - M)*A_src on the kept conditional rows, for steps < int(self_replace*N)."""

    def __init__(self, run: FateZeroRun, layer: Layer):
        self.run, self.layer = run, layer

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        run, step, t = self.run, call.layout.step, call.layout.timestep
        if step >= run.self_steps:
            return p
        rows, frames, source = run.fusion_inputs(call, p, "self_probs")
        if run.live:
            mask = run.live_self_mask(step, self.layer.grid, frames)
        else:
            mask = run.self_mask(t, self.layer.grid, frames)
        p = p.clone()
        p[rows] = fuse_self_attention(p[rows], source, None if mask is None else mask.to(p.device, p.dtype))
        return p


class CrossAttentionFusion(AttnEdit):
    """p2p on the conditional rows for steps < int(cross_replace*(N+1)); on the mask layers also keeps
    the live source's blend-word maps and sums the target words' maps for the latent blend."""

    def __init__(self, run: FateZeroRun, layer: Layer):
        self.run, self.layer = run, layer

    def probs(self, call: AttnCall, p: Tensor) -> Tensor:
        run, step = self.run, call.layout.step
        fuse = step < run.cross_steps
        record = run.records_target_at(step) and run.records_target(self.layer)
        watch = run.watches(self.layer) and run.watches_at(step)
        if watch:
            run.live_maps.add(step, call.name, call.layout.frame_ids, p[source_rows(call.layout, p.shape[0])])
        if record:
            kept, frames = run.kept_rows(call, p.shape[0])
            run.add_target_maps(call.name, frames, p[kept])
        if not fuse:
            return p
        rows, frames, source = run.fusion_inputs(call, p, "cross_probs")
        target = p[rows]
        if run.params.mode == "replace":
            fused = replace_maps(source, run.replace_matrix.to(p.device, p.dtype))
        else:
            fused = refine_maps(source, target, run.mapper.to(p.device), run.alphas.to(p.device, p.dtype))
        if run.equalizer is not None:
            fused = fused * run.equalizer.to(p.device, p.dtype)  # p2p AttentionReweight on the fused maps
        p = p.clone()
        p[rows] = fused  # alpha = 1 inside the window: alpha*fused + (1 - alpha)*target = fused
        return p
