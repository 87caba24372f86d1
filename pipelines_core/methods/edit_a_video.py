"""Edit-A-Video (Shin et al., ACML 2023): single video editing with object-aware consistency.

The method is three stages, two of which the pack already has:

1. one-shot tuning of the model on the clip with sparse-causal attention (Tune-A-Video; Tune on Clip,
   `tune_a_video.py`);
2. DDIM inversion of the clip with the tuned model, then sampling from x_T with prompt-to-prompt attention
   control: the source's self-attention maps fused into the edit under a blend-word mask, cross-attention
   refine/replace and the latent blend after each step (FateZero's injector, `fatezero.py`);
3. the paper's own contribution, **sparse-causal blending** (SC Blending; the ACML version calls it
   temporal-consistent blending, TC Blending). Prompt-to-prompt's local blend keeps the source outside the
   edited object: x <- x_src + M*(x - x_src) after a step, M the blend words' cross-attention maps
   thresholded. Per frame, M flickers: the object's region is found anew in every frame, so background
   pixels drift in and out of the edit from one frame to the next. SC blending gives frame i the union of
   the masks of the first frame, the previous frame and its own,

       M_sc[i] = M[0] | M[i-1] | M[i]          (frame 0: M[0], its own),

   the frames whose keys frame i's sparse-causal attention reads (`first_and_previous` in
   attention/rules.py, joined to the frame's own).

No code was released with the paper; the rule above is reconstructed from its description (the masks of
the first and the previous frame joined to the frame's own mask, as its sparse-causal attention joins
their keys). It is applied to the latent blend (FateZero's LatentBlend, `FateZeroParams.blend_frames =
"sparse_causal"`), whose masks are the whole clip's in frame order after each step; the self-attention
MaskBlend of FateZero stays per frame.

Where the pack differs from the paper: its first stage inflates the image model with temporal modules
and tunes them on the clip; Tune on Clip adds no temporal module and trains a LoRA on the attention
queries under sparse-causal attention (Tune-A-Video's tuning), the frames meeting through the cross-frame
attention of DDIM Invert and the sampler. The attention control is FateZero's (its fusion, thresholds and
windows, `fatezero.py`), the pack's prompt-to-prompt controller, as the Video-P2P recipe uses it too.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from ..attention.rules import first_and_previous
from ..sampling.injection import Injection

SPARSE_CAUSAL = "sparse_causal"  # FateZeroParams.blend_frames value: the latent blend's masks joined this way


def sparse_causal_union(masks: Tensor) -> Tensor:
    """M_sc[i] = M[0] | M[i-1] | M[i]: each frame's mask joined with those of the frames its sparse-causal
    attention reads (frame 0 reads itself only, so it keeps its own mask).

    masks: bool (F, h, w), the clip's frames in order -> bool (F, h, w).
    """
    read = first_and_previous(masks.shape[0]).to(masks.device)  # (F, 2): [0, i-1], frame 0: [0, 0]
    return masks | masks[read].any(dim=1)


def edit_a_video(injection: Injection) -> Injection:
    """FateZero's injection (`fatezero_injection`) with sparse-causal blending: its latent blend's masks joined
    across frames. Needs blend words (checked): without them there is no latent blend to make consistent."""
    params = replace(injection.params, blend_frames=SPARSE_CAUSAL)
    params.check()
    return replace(injection, mode="edit_a_video", params=params)
