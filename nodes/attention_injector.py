"""Attention Injector: what the sampler injects from a DDIM inversion, per method."""

from __future__ import annotations

from ..pipelines_core.methods.fatezero import FateZeroParams, fatezero_injection
from ..pipelines_core.methods.plug_and_play import PnPParams, pnp_injection
from ..pipelines_core.methods.tokenflow import TokenFlowParams, tokenflow_injection
from ..pipelines_core.methods.pix2video import Pix2VideoParams, pix2video_injection

MODES = ["FateZero", "Plug-and-Play", "TokenFlow", "Pix2Video"]


def words(text: str) -> tuple:
    return tuple(w.strip() for w in text.split(",") if w.strip())


def numbers(text: str) -> tuple:
    try:
        return tuple(float(v) for v in words(text))
    except ValueError:
        raise ValueError(f"Attention Injector: equalizer_values must be numbers separated by commas (got {text!r})") from None


class VE_AttentionInjector:
    DESCRIPTION = (
        "Describe what the Cross-Frame Sampler injects from DDIM Invert. FateZero: self-attention map fusion "
        "with a blend-word mask + prompt-to-prompt cross-attention (needs attention maps recorded). Plug-and-Play: "
        "decoder residual features and self-attention Q/K from a live source branch. TokenFlow: PnP + keyframe "
        "extended attention propagated to every frame by nearest neighbours. Pix2Video: anchor+previous "
        "decoder attention and x̂0 guidance toward the previous frame. Defaults are the papers'."
    )
    CATEGORY = "video edit/inversion"
    RETURN_TYPES = ("VE_INJECTION",)
    RETURN_NAMES = ("injection",)
    OUTPUT_TOOLTIPS = ("The injection, for the Cross-Frame Sampler (with the same inversion).",)
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

    def build(self, inversion, mode, fatezero_source, self_replace, cross_replace, p2p_mode, blend_words, target_blend_words,
              blend_threshold, equalizer_words, equalizer_values, pnp_f_t, pnp_attn_t, keyframe_every,
              keyframe_weights, guidance_weight, guidance_until):
        if mode == "FateZero":
            params = FateZeroParams(
                cross_replace=cross_replace, self_replace=self_replace, mode=p2p_mode, blend_words=words(blend_words),
                target_blend_words=words(target_blend_words), blend_th=blend_threshold,
                equalizer_words=words(equalizer_words), equalizer_values=numbers(equalizer_values),
                latent_blend=(0.2, 0.8) if blend_words.strip() else None, source=fatezero_source,
            )
            return (fatezero_injection(inversion, params),)
        if mode == "Plug-and-Play":
            return (pnp_injection(inversion, PnPParams(pnp_f_t, pnp_attn_t)),)
        if mode == "TokenFlow":
            return (tokenflow_injection(inversion, TokenFlowParams(pnp_f_t, pnp_attn_t, keyframe_every, keyframe_weights)),)
        return (pix2video_injection(inversion, Pix2VideoParams(guidance_weight, guidance_until)),)
