"""Attention Injector (deprecated): split into one node per method (nodes/method_*.py).

Kept registered with its old inputs, frozen as they were, so a saved workflow that names it still loads and
converts (its widget values are positional over these inputs); validation then stops the run before anything
executes and names the node that replaces it for its mode.
"""

from __future__ import annotations

from .methods import discover

MODES = ["FateZero", "Plug-and-Play", "TokenFlow", "Pix2Video"]


def replacement_message(mode: str) -> str:
    """One line: which method node replaces an Attention Injector set to `mode`."""
    method = next((m for m in discover() if m.name == mode), None)
    if method is None:
        return (f"Attention Injector was split into one node per method, and none is named {mode!r}: replace this "
                "node by one of the 'Attention Injector (...)' nodes under video edit/inversion")
    return (f"Attention Injector was split into one node per method: replace this node (mode {mode}) by "
            f"'{method.display_name}' ({method.node_id}) under video edit/inversion — same widget names, "
            "same values")


class VE_AttentionInjector:
    DESCRIPTION = (
        "Deprecated: split into one node per method — Attention Injector (FateZero), (Plug-and-Play), (TokenFlow) "
        "and (Pix2Video), with the same widget names. Kept so old workflows load; running it stops and names the "
        "node that replaces it."
    )
    DEPRECATED = True  # ComfyUI hides it from the node search
    CATEGORY = "video edit/inversion"
    RETURN_TYPES = ("VE_INJECTION",)
    RETURN_NAMES = ("injection",)
    OUTPUT_TOOLTIPS = ("Nothing: this node stops the run and names its replacement.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        frac = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "inversion": ("VE_INVERSION", {"tooltip": "From DDIM Invert."}),
                "mode": (MODES, {"default": "FateZero", "tooltip": "Which method's injection to use."}),
                "fatezero_source": (["live", "stored"], {"default": "live",
                                                         "tooltip": "FateZero: source attention maps from a live source "
                                                                    "branch while sampling (DDIM Invert: latents only; "
                                                                    "~1.5x compute, no stored maps) or recorded by DDIM "
                                                                    "Invert (paper-exact; tens of GB at 512 px)."}),
                "self_replace": ("FLOAT", {"default": 0.8, **frac,
                                           "tooltip": "FateZero: fuse self-attention maps for this fraction of steps "
                                                      "(0.8 style, 0.5 shape)."}),
                "cross_replace": ("FLOAT", {"default": 0.8, **frac,
                                            "tooltip": "FateZero: prompt-to-prompt cross-attention for this fraction."}),
                "p2p_mode": (["refine", "replace"], {"default": "refine",
                                                     "tooltip": "FateZero: refine (style; any prompt) or replace "
                                                                "(same word count; objects)."}),
                "blend_words": ("STRING", {"default": "",
                                           "tooltip": "FateZero: source-prompt words whose region is edited (comma "
                                                      "separated); empty = edit everywhere."}),
                "target_blend_words": ("STRING", {"default": "",
                                                  "tooltip": "FateZero: target-prompt words for the latent blend mask."}),
                "blend_threshold": ("FLOAT", {"default": 0.3, **frac, "tooltip": "FateZero: blend mask threshold."}),
                "equalizer_words": ("STRING", {"default": "",
                                               "tooltip": "FateZero: target words whose attention is scaled."}),
                "equalizer_values": ("STRING", {"default": "",
                                                "tooltip": "FateZero: one scale per equalizer word, e.g. 10."}),
                "pnp_f_t": ("FLOAT", {"default": 0.8, **frac,
                                      "tooltip": "PnP/TokenFlow: inject residual features for this fraction of steps."}),
                "pnp_attn_t": ("FLOAT", {"default": 0.5, **frac,
                                         "tooltip": "PnP/TokenFlow: inject self-attention Q/K for this fraction."}),
                "keyframe_every": ("INT", {"default": 8, "min": 1, "max": 256,
                                           "tooltip": "TokenFlow: one random keyframe per this many frames, every step."}),
                "keyframe_weights": (["linear", "sigmoid"], {"default": "linear",
                                                             "tooltip": "TokenFlow: the paper's linear blend of the two "
                                                                        "nearest keyframes, or the official code's sigmoid."}),
                "guidance_weight": ("FLOAT", {"default": 100.0, "min": 0.0, "max": 10000.0, "step": 1.0,
                                              "tooltip": "Pix2Video: x̂0 guidance weight (100 at 512 px; smaller "
                                                         "latents need less)."}),
                "guidance_until": ("FLOAT", {"default": 0.5, **frac,
                                             "tooltip": "Pix2Video: guide for this fraction of the steps."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, mode):
        # Refused at validation, so an old workflow stops before DDIM Invert or anything else runs.
        return replacement_message(mode)

    def build(self, inversion, mode, fatezero_source, self_replace, cross_replace, p2p_mode, blend_words,
              target_blend_words, blend_threshold, equalizer_words, equalizer_values, pnp_f_t, pnp_attn_t,
              keyframe_every, keyframe_weights, guidance_weight, guidance_until):
        raise ValueError(replacement_message(mode))
