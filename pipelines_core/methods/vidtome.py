"""VidToMe (Li et al., CVPR'24): self-attention over the tokens of a chunk of frames merged into one set.

In every self-attention layer (attn1, whose input is norm1's tokens) at a level downsampled at most
`max_downsample` times (SD-1.5 at 512 px: the 64² and 32² levels, down_blocks.0/1 and up_blocks.2/3; read
from where the UNet's down/up samplers sit, not from names), each UNet call's tokens are merged before
attention and unmerged after it (`AttnEdit.tokens`):
  1. local merging: the frames of the call (a VidToMe chunk, `chunk_size` 4 frames) are joined into one token
     sequence; one random destination frame per `target_stride` frames is drawn, and bipartite soft matching
     by cosine similarity merges `local_merge_ratio` of the other (source) frames' tokens into their most
     similar destination token (mode "replace": a merged token is dropped and takes its destination's output on
     unmerge; "mean": the destination becomes the mean of itself and the tokens merged into it). With more
     frames than one stride the merge repeats (8 -> 2 -> 1 frames) on what is left;
  2. global merging: the merged tokens of the chunk before (in this step, this layer) are the global tokens;
     with probability `1 - global_rand` the chunk's tokens are the source side and the globals the destination,
     else the reverse, and `global_merge_ratio` of the source side is merged. The chunk's tokens after this
     matching become the next chunk's globals; globals are cleared at every step;
  3. attention runs once per role (source/uncond/cond) over the merged set: every token sees every merged token
     of the chunk, so the chunk's frames share keys, values and (for merged tokens) outputs;
  4. unmerge maps the outputs back: each token gets its own output or, when it was merged, its destination's.
The matching is computed once per call and used for all of its rows (`align_batch`, as VidToMe does with PnP:
the similarity of a source token to a destination token is the best over the rows), so the source branch's
Q/K that Plug-and-Play copies line up with the edit's. Merging runs on the attn1 input only; cross-attention
and the feed-forward see every token.

Chunks: each step the frames are split as VidToMe's `get_chunks` does (a first chunk of random length 1..
`chunk_size`, then chunks of `chunk_size`; the list reversed with probability 1/2; with global merging the
chunk order "mix" (VidToMe's "mix-4": a quarter of the chunks in random order first, the rest in sequence),
"seq" or "rand"), through `InjectionPlan.wrap_denoiser`: the sampler's denoiser runs one call per VidToMe
chunk. The sampler's chunk_size does not apply while VidToMe runs.

Randomness (chunks, destination frames, global sides) comes from one generator seeded by the sampler's seed,
drawn in a fixed order, so a seed gives one result. Destination frames and global sides are drawn once per UNet
call and shared by all its merged layers (VidToMe forks one generator state into every block, which draws the
same values in one pass).

Composition: the plan is the inner injection's plan (e.g. Plug-and-Play's Q/K and feature injection, its live
source branch) plus the merge edits (`merged_plan`); without an inner injection VidToMe works alone on any start
(SDEdit, inversion, noise).

Where we differ from the official code (VidToMe 064c7b1, vidtome/merge.py, patch.py):
  * SD-1.5 through diffusers processors instead of patched BasicTransformerBlock classes; the merge is a token
    edit of the attention processor, the layer set is derived from the UNet;
  * recursive local merging keeps the tokens left unmerged by earlier rounds at the front of the sequence (the
    code appends them to the destination side but then counts them as if they were at the front, so from the
    second round its frame boundaries are off by that many tokens); with chunk_size <= target_stride (the
    defaults) there is one round and both agree;
  * similarities are computed in fp32, a block of source tokens at a time, and ties in the ranking are broken
    by position (stable sort);
  * global tokens stay on the sampling device (the code moves them to the CPU: at 512 px they are at most a few
    tens of MB per layer);
  * every self-attention layer not merged keeps per-frame attention (as in VidToMe, whose unmerged layers are
    the image model's): the sampler's cross-frame rule is replaced on every attn1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from ..attention.attach import is_self_attention
from ..attention.processor import AttnCall, AttnEdit, FrameLayout
from ..attention.rules import own_frame
from ..sampling.chunks import Chunk
from ..sampling.injection import Injection, InjectionPlan, PlanContext

MERGE_MODES = ("replace", "mean")
CHUNK_ORDERS = ("mix", "seq", "rand")
SCORE_BLOCK = 2**26  # similarity entries computed at once in the matching
MIX_DIVISOR = 4  # VidToMe's default chunk order "mix-4": len(chunks) / 4 chunks in random order come first


@dataclass(frozen=True)
class VidToMeParams:
    """VidToMe's defaults (configs/default.yaml, vidtome/patch.py apply_patch)."""

    local_merge_ratio: float = 0.9
    merge_global: bool = True
    global_merge_ratio: float = 0.8
    global_rand: float = 0.5  # probability that the globals are the source side of the global matching
    chunk_size: int = 4
    chunk_order: str = "mix"
    target_stride: int = 4  # one destination frame per this many frames
    max_downsample: int = 2  # merge at levels downsampled at most this much (1, 2: SD's 64² and 32² at 512 px)
    merge_mode: str = "replace"
    align_batch: bool = True  # one matching for all rows of a call (always on with a live source branch)

    def check(self) -> None:
        for name in ("local_merge_ratio", "global_merge_ratio", "global_rand"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (got {value})")
        for name in ("chunk_size", "target_stride", "max_downsample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.chunk_order not in CHUNK_ORDERS:
            raise ValueError(f"unknown chunk_order {self.chunk_order!r}; choose one of {', '.join(CHUNK_ORDERS)}")
        if self.merge_mode not in MERGE_MODES:
            raise ValueError(f"unknown merge_mode {self.merge_mode!r}; choose one of {', '.join(MERGE_MODES)}")


# --- bipartite soft matching (pure functions) ---------------------------------------------------

@dataclass(frozen=True)
class Matching:
    """A bipartite soft matching of a token sequence of `length` tokens.

    `src`/`dst`: positions of the source and destination sides; `merged` (r) and `kept` (the rest): indices into
    `src` of the source tokens merged and left alone; `into`: for each merged one, its destination (index into
    `dst`). Index tensors are (rows, k) with rows 1 when the matching is shared by all rows (align_batch).
    Merged sequence: [kept source tokens | destination tokens].
    """

    length: int
    src: torch.Tensor  # (S,)
    dst: torch.Tensor  # (D,)
    merged: torch.Tensor  # (rows, r)
    kept: torch.Tensor  # (rows, S - r)
    into: torch.Tensor  # (rows, r)
    mode: str = "replace"

    @property
    def merged_length(self) -> int:
        return self.kept.shape[1] + len(self.dst)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, length, c) -> (rows, merged_length, c)."""
        src, dst = x[:, self.src], x[:, self.dst]
        kept = _take(src, self.kept)
        if self.mode == "mean":  # the destination becomes the mean of itself and the tokens merged into it
            index = self.into.expand(x.shape[0], -1)[..., None].expand(-1, -1, x.shape[-1])
            dst = dst.scatter_reduce(1, index, _take(src, self.merged), reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(rows, merged_length, c) -> (rows, length, c): a merged token takes its destination's value."""
        rows, c = y.shape[0], y.shape[-1]
        kept, dst = y[:, :self.kept.shape[1]], y[:, self.kept.shape[1]:]
        out = y.new_empty(rows, self.length, c)
        out[:, self.dst] = dst
        src_at = self.src.to(y.device)
        out.scatter_(1, _spread(src_at[self.kept], rows, c), kept)
        out.scatter_(1, _spread(src_at[self.merged], rows, c), _take(dst, self.into))
        return out


def _spread(index: torch.Tensor, rows: int, channels: int) -> torch.Tensor:
    return index.expand(rows, -1)[..., None].expand(-1, -1, channels)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[r, index[r]] for every row (index rows 1 = the same for all rows)."""
    return x.gather(1, _spread(index, x.shape[0], x.shape[-1]))


def bipartite_matching(metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, ratio: float,
                       aligned: bool = True, mode: str = "replace", block: int = SCORE_BLOCK) -> Matching:
    """Merge r = int(S * ratio) source tokens, those most cosine-similar to a destination token, into it.

    metric: (rows, N, c). aligned: one matching for all rows, a source token's score against a destination
    token being the best over the rows (VidToMe's align_batch: `scores = cat([*scores], -1)`).
    """
    src, dst = src.to(metric.device), dst.to(metric.device)
    m = F.normalize(metric.float(), dim=-1)
    a, b = m[:, src], m[:, dst].transpose(1, 2)
    group = max(1, block // (a.shape[0] * len(dst)))  # source tokens scored at once, bounding the score matrix
    best, at = [], []
    for s in range(0, len(src), group):
        scores = a[:, s:s + group] @ b  # rows s D
        if aligned:
            scores = rearrange(scores, "b s d -> s (b d)")[None]
        found = scores.max(dim=-1)
        best.append(found.values)
        at.append(found.indices % len(dst))
    best, at = torch.cat(best, dim=1), torch.cat(at, dim=1)
    r = min(len(src), int(len(src) * ratio))
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    merged = order[:, :r]
    return Matching(metric.shape[1], src, dst, merged, order[:, r:], at.gather(1, merged), mode)


def frame_matching(metric: torch.Tensor, frames: int, carried: int, ratio: float, dst_frame: int, stride: int,
                   aligned: bool = True, mode: str = "replace") -> Matching:
    """Local matching of a joined sequence [carried | frame 0 | frame 1 | ...] (VidToMe's
    bipartite_soft_matching_randframe): frames f with f % min(stride, frames) == dst_frame and the carried
    tokens (left unmerged by an earlier round) are the destinations, the other frames' tokens the sources.
    The merged sequence is [kept source tokens | carried | destination frames]."""
    n = metric.shape[1]
    per_frame = (n - carried) // frames
    position = torch.arange(n - carried)
    is_dst = (position // per_frame) % min(stride, frames) == dst_frame
    src = position[~is_dst] + carried
    dst = torch.cat([torch.arange(carried), position[is_dst] + carried])
    return bipartite_matching(metric, src, dst, ratio, aligned, mode)


def local_merges(tokens: torch.Tensor, frames: int, ratio: float, stride: int, draw_dst: Callable[[int, int], int],
                 aligned: bool = True, mode: str = "replace") -> list[Matching]:
    """The rounds of local merging of one chunk's joined tokens (rows, frames * n, c), until one frame is left
    (4 -> 1 frames, or 8 -> 2 -> 1 with stride 4). `draw_dst(round, choices)` picks a round's destination frame."""
    matchings, carried, left = [], 0, frames
    per_frame = tokens.shape[1] // frames
    if ratio <= 0:  # nothing merges: the joined sequence itself (VidToMe's do_nothing)
        return matchings
    while left > 1:
        matching = frame_matching(tokens, left, carried, ratio, draw_dst(len(matchings), min(stride, left)), stride,
                                  aligned, mode)
        tokens = matching.merge(tokens)
        carried += matching.kept.shape[1]
        left = (tokens.shape[1] - carried) // per_frame
        matchings.append(matching)
    return matchings


def global_matching(local: torch.Tensor, globals_: torch.Tensor, local_is_src: bool, ratio: float,
                    aligned: bool = True, mode: str = "replace") -> tuple[Matching, torch.Tensor, slice]:
    """VidToMe's global merge (bipartite_soft_matching_2s): the sequence [source side | destination side] of the
    chunk's merged tokens and the globals; returns the matching, that sequence, and where the chunk's tokens
    sit in it (what unmerge keeps)."""
    first, second = (local, globals_) if local_is_src else (globals_, local)
    tokens = torch.cat([first, second.to(first)], dim=1)
    split = first.shape[1]
    matching = bipartite_matching(tokens, torch.arange(split), torch.arange(split, tokens.shape[1]), ratio, aligned,
                                  mode)
    return matching, tokens, slice(0, split) if local_is_src else slice(split, tokens.shape[1])


# --- token counts and memory (pure arithmetic, for the figures in the docs) ----------------------------

def merged_token_count(tokens: int, frames: int, ratio: float, stride: int = 4, global_tokens: int = 0,
                       global_ratio: float = 0.0, local_is_src: bool = True) -> int:
    """Tokens one row of a chunk attends with after local merging (destination frame 0 each round) and, when
    `global_tokens` > 0, global merging. Mirrors `local_merges` / `global_matching` without any tensor."""
    count, carried, left = frames * tokens, 0, frames
    while ratio > 0 and left > 1:
        dst_frames = len([f for f in range(left) if f % min(stride, left) == 0])
        sources = (left - dst_frames) * tokens
        kept = sources - min(sources, int(sources * ratio))
        count = kept + carried + dst_frames * tokens
        carried += kept
        left = (count - carried) // tokens
    if global_tokens:
        sources = count if local_is_src else global_tokens
        count = count + global_tokens - min(sources, int(sources * global_ratio))
    return count


def attention_bytes(rows: int, queries: int, keys: int, channels: int, heads: int, itemsize: int) -> dict:
    """Bytes one self-attention call holds: keys + values (rows, keys, channels) each, and the probabilities
    (rows, heads, queries, keys) an explicit softmax materialises."""
    return {"kv": 2 * rows * keys * channels * itemsize, "probs": rows * heads * queries * keys * itemsize}


# --- layers -------------------------------------------------------------------------------------

def block_downsampling(unet) -> dict[str, int]:
    """How many times each down/mid/up block's input is downsampled, from where the UNet's samplers sit."""
    factors, factor = {}, 1
    for i, block in enumerate(unet.down_blocks):
        factors[f"down_blocks.{i}"] = factor
        factor *= 2 if getattr(block, "downsamplers", None) else 1
    factors["mid_block"] = factor
    for i, block in enumerate(unet.up_blocks):
        factors[f"up_blocks.{i}"] = factor
        factor //= 2 if getattr(block, "upsamplers", None) else 1
    return factors


def merge_layers(unet, max_downsample: int) -> frozenset:
    """The self-attention processors VidToMe merges: every attn1 in a block downsampled at most `max_downsample`
    times (SD-1.5: down_blocks.0/1 and up_blocks.2/3, 10 layers)."""
    factors = block_downsampling(unet)

    def block(name: str) -> str:
        return "mid_block" if name.startswith("mid_block.") else ".".join(name.split(".")[:2])

    return frozenset(n for n in unet.attn_processors
                     if is_self_attention(n) and factors.get(block(n), max_downsample + 1) <= max_downsample)


# --- chunks -------------------------------------------------------------------------------------

def draw_chunks(frame_count: int, size: int, order: str, merge_global: bool, generator: torch.Generator) -> list:
    """One step's chunks, as VidToMe's Generator.get_chunks draws them: a first chunk of random length 1..size,
    then chunks of `size`; the list reversed with probability 1/2; with global merging put in `order`."""
    frames = list(range(frame_count))
    first = int(torch.randint(size, (1,), generator=generator)) + 1
    chunks = [frames[:first]] + [frames[s:s + size] for s in range(first, frame_count, size)]
    if float(torch.rand(1, generator=generator)) > 0.5:
        chunks = chunks[::-1]
    if not merge_global or order == "seq":
        return chunks
    permutation = torch.randperm(len(chunks), generator=generator).tolist()
    if order == "rand":
        return [chunks[i] for i in permutation]
    # "mix": a share of the chunks in random order, then the rest in sequence, walked from the end nearer to
    # the last random one
    shuffled = int(len(chunks) / MIX_DIVISOR)
    sequence = sorted(permutation[shuffled:])
    if shuffled and abs(sequence[-1] - permutation[shuffled - 1]) < abs(sequence[0] - permutation[shuffled - 1]):
        sequence = sequence[::-1]
    return [chunks[i] for i in permutation[:shuffled] + sequence]


# --- the edit -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MergedLayout(FrameLayout):
    """The layout of a merged attn1 call: one row per role holding the chunk's merged tokens; `merged_from` are
    the clip frames they came from."""

    merged_from: tuple = ()


class VidToMeRun:
    """The state of one sampling run: its generator, the draws of every UNet call, each layer's global tokens."""

    def __init__(self, params: VidToMeParams, seed: int, aligned: bool):
        self.params = params
        self.aligned = aligned
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.draws: dict = {}  # (step, frame ids) -> {("dst", round) | ("global",): value}
        self.globals: dict = {}  # layer name -> the chunk tokens the next chunk merges with (this step)
        self.globals_step = None

    def chunks(self, frame_count: int) -> list:
        return draw_chunks(frame_count, self.params.chunk_size, self.params.chunk_order, self.params.merge_global,
                           self.generator)

    def draw(self, layout: FrameLayout, what: tuple, sample: Callable[[torch.Generator], object]):
        """A call's random value `what`: drawn by its first merged layer, the same for all its layers."""
        call = self.draws.setdefault((layout.step, tuple(layout.frame_ids)), {})
        if what not in call:
            call[what] = sample(self.generator)
        return call[what]

    def globals_for(self, layout: FrameLayout) -> dict:
        if layout.step != self.globals_step:  # globals live for one step (VidToMe's post_iter clears them)
            self.globals, self.globals_step = {}, layout.step
        return self.globals


class TokenMerge(AttnEdit):
    """VidToMe's merge (before attention) and unmerge (after) as a token edit of the merged attn1 layers."""

    def __init__(self, run: VidToMeRun):
        self.run = run

    def tokens(self, call: AttnCall, hidden_states: torch.Tensor):
        layout = call.layout
        if not call.is_self or call.has_mask or layout is None:
            return hidden_states, call, None
        if layout.groups != 1:
            raise RuntimeError(f"VidToMe merges one chunk per UNet call, and {call.name} got {layout.groups} "
                               "chunks in one call")
        params, run = self.run.params, self.run
        frames = layout.frames
        joined = rearrange(hidden_states, "(r f) n c -> r (f n) c", f=frames)

        def draw_dst(round_: int, choices: int) -> int:
            return run.draw(layout, ("dst", round_), lambda g: int(torch.randint(choices, (1,), generator=g)))

        locals_ = local_merges(joined, frames, params.local_merge_ratio, params.target_stride, draw_dst,
                               run.aligned, params.merge_mode)
        merged = joined
        for matching in locals_:
            merged = matching.merge(merged)
        restore_global = None
        if params.merge_global:
            store = run.globals_for(layout)
            previous = store.get(call.name)
            if previous is None:
                store[call.name] = merged
            else:
                local_is_src = run.draw(layout, ("global",), lambda g: float(torch.rand(1, generator=g))) \
                    > params.global_rand
                matching, tokens, own = global_matching(merged, previous, local_is_src, params.global_merge_ratio,
                                                        run.aligned, params.merge_mode)
                merged = matching.merge(tokens)
                store[call.name] = matching.unmerge(merged)[:, own]

                def restore_global(y: torch.Tensor, matching=matching, own=own) -> torch.Tensor:
                    return matching.unmerge(y)[:, own]

        def unmerge(out: torch.Tensor) -> torch.Tensor:
            if restore_global is not None:
                out = restore_global(out)
            for matching in reversed(locals_):
                out = matching.unmerge(out)
            return rearrange(out, "r (f n) c -> (r f) n c", f=frames)

        merged_layout = MergedLayout(1, tuple(layout.frame_ids[:1]), layout.roles, layout.timestep, layout.step,
                                     merged_from=tuple(layout.frame_ids))
        return merged, replace(call, layout=merged_layout), unmerge


# --- the plan -----------------------------------------------------------------------------------

def merged_plan(inner: InjectionPlan, merge: AttnEdit, layers: frozenset,
                wrap_denoiser: Callable, mode: str = "inner") -> InjectionPlan:
    """The inner plan plus VidToMe: the inner edits, then the merge on `layers`; per-frame attention on every
    attn1 the inner plan sets no rule for; VidToMe's chunking of the frames; the inner hooks, patches and source
    branch as they are. Refuses inner plans whose edits on the merged layers change tokens or read attention
    probabilities (they would see merged tokens, not frames), whose rule there reads other frames, or that wrap
    the denoiser themselves."""
    for name in sorted(layers):
        for edit in inner.edits_for(name):
            if edit.changes_tokens or edit.needs_probs:
                raise ValueError(f"VidToMe merges the self-attention tokens of {name}, where the {mode} injection "
                                 f"also changes tokens or attention maps ({type(edit).__name__}): connect "
                                 "Plug-and-Play or nothing as VidToMe's injection input")
        rule = inner.rule_for(name)
        if rule is not None and rule is not own_frame:
            raise ValueError(f"the {mode} injection sets the cross-frame rule {rule.name!r} on {name}, which VidToMe "
                             "merges: connect Plug-and-Play or nothing as VidToMe's injection input")
    if inner.wrap_denoiser is not InjectionPlan.__dataclass_fields__["wrap_denoiser"].default:
        raise ValueError(f"the {mode} injection changes how frames reach the UNet, and so does VidToMe: connect "
                         "Plug-and-Play or nothing as VidToMe's injection input")

    def edits_for(name: str) -> tuple:
        return tuple(inner.edits_for(name)) + ((merge,) if name in layers else ())

    def rule_for(name: str):
        chosen = inner.rule_for(name)
        return own_frame if chosen is None and is_self_attention(name) else chosen

    return InjectionPlan(edits_for=edits_for, rule_for=rule_for, hooks=inner.hooks, patches=inner.patches,
                         source_branch=inner.source_branch, wrap_denoiser=wrap_denoiser)


@dataclass(frozen=True)
class VidToMeSetup:
    """VidToMe's parameters and the injection it wraps (None: VidToMe alone)."""

    params: VidToMeParams
    inner: Optional[Injection] = None

    def check(self) -> None:
        self.params.check()


def chunked(run: VidToMeRun) -> Callable:
    """The denoiser wrapper: one call per VidToMe chunk, drawn anew at every step."""

    def wrap(denoiser):
        def denoise(latents: torch.Tensor, state) -> torch.Tensor:
            chunks = [Chunk(tuple(c), tuple(range(len(c)))) for c in run.chunks(latents.shape[0])]
            # one call per chunk, in order: each chunk merges with the global tokens the chunk before it left
            return replace(denoiser, chunks=chunks, batch=1)(latents, state)

        return denoise

    return wrap


def vidtome_planner(injection: Injection, context: PlanContext) -> InjectionPlan:
    setup: VidToMeSetup = injection.params
    inner = setup.inner.plan(context) if setup.inner is not None else InjectionPlan()
    run = VidToMeRun(setup.params, context.seed, aligned=setup.params.align_batch or inner.source_branch)
    layers = merge_layers(context.model.unet, setup.params.max_downsample)
    mode = setup.inner.mode if setup.inner is not None else "inner"
    return merged_plan(inner, TokenMerge(run), layers, chunked(run), mode)


def vidtome_injection(params: VidToMeParams = VidToMeParams(), inner: Optional[Injection] = None) -> Injection:
    """VE_INJECTION for VidToMe, alone or around `inner` (e.g. Plug-and-Play), whose inversion it passes on."""
    params.check()
    if inner is not None and not isinstance(inner, Injection):
        raise ValueError("VidToMe's injection input takes an Attention Injector's output (VE_INJECTION)")
    return Injection("vidtome", inner.inversion if inner is not None else None, VidToMeSetup(params, inner),
                     vidtome_planner)
