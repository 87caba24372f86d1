"""Attention Injector (FateZero): the source's attention fused into the edit, from a DDIM inversion."""

from __future__ import annotations

from ..pipelines_core.methods.fatezero import FateZeroParams, comma_numbers, comma_words, fatezero_injection
from .methods import FRACTION, INVERSION, InjectorNode, MethodNode, Paper


class VE_InjectFateZero(InjectorNode):
    DESCRIPTION = (
        "What the Cross-Frame Sampler injects from DDIM Invert, the FateZero way: self-attention map fusion with "
        "a blend-word mask + prompt-to-prompt cross-attention, the source maps from a live source branch or "
        "recorded by DDIM Invert. Defaults are the paper's (Qi et al., ICCV 2023)."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "inversion": INVERSION,
                "fatezero_source": (["live", "stored"], {"default": "live",
                                                         "tooltip": "Source attention maps from a live source branch "
                                                                    "while sampling (DDIM Invert: latents only; ~1.5x "
                                                                    "compute, no stored maps) or recorded by DDIM Invert "
                                                                    "(paper-exact; tens of GB at 512 px)."}),
                "self_replace": ("FLOAT", {"default": 0.8, **FRACTION,
                                           "tooltip": "Fuse self-attention maps for this fraction of steps "
                                                      "(0.8 style, 0.5 shape)."}),
                "cross_replace": ("FLOAT", {"default": 0.8, **FRACTION,
                                            "tooltip": "Prompt-to-prompt cross-attention for this fraction."}),
                "p2p_mode": (["refine", "replace"], {"default": "refine",
                                                     "tooltip": "Refine (style; any prompt) or replace "
                                                                "(same word count; objects)."}),
                "blend_words": ("STRING", {"default": "",
                                           "tooltip": "Source-prompt words whose region is edited (comma separated); "
                                                      "empty = edit everywhere."}),
                "target_blend_words": ("STRING", {"default": "",
                                                  "tooltip": "Target-prompt words for the latent blend mask."}),
                "blend_threshold": ("FLOAT", {"default": 0.3, **FRACTION, "tooltip": "Blend mask threshold."}),
                "equalizer_words": ("STRING", {"default": "", "tooltip": "Target words whose attention is scaled."}),
                "equalizer_values": ("STRING", {"default": "", "tooltip": "One scale per equalizer word, e.g. 10."}),
            }
        }

    def build(self, inversion, fatezero_source, self_replace, cross_replace, p2p_mode, blend_words,
              target_blend_words, blend_threshold, equalizer_words, equalizer_values):
        params = FateZeroParams(  # the latent blend (0.2-0.8) acts only with blend words, as FateZero's does
            cross_replace=cross_replace, self_replace=self_replace, mode=p2p_mode, blend_words=comma_words(blend_words),
            target_blend_words=comma_words(target_blend_words), blend_th=blend_threshold,
            equalizer_words=comma_words(equalizer_words), equalizer_values=comma_numbers(equalizer_values),
            source=fatezero_source,
        )
        return (fatezero_injection(inversion, params),)


METHOD = MethodNode(
    name="FateZero", display_name="Attention Injector (FateZero)", node=VE_InjectFateZero,
    paper=Paper("FateZero: Fusing Attentions for Zero-shot Text-based Video Editing", "Qi et al.", "ICCV 2023",
                "https://arxiv.org/abs/2303.09535"),
    mechanism="the source's self-attention maps fused into the edit under a blend-word mask, prompt-to-prompt "
              "refine/replace on cross-attention, equalizer, latent blend",
    # Video-P2P's recipe (a clip-tuned model + null-text inversion) drives the edit with this injector.
    workflows=("fatezero_edit.json", "video_p2p_edit.json"),
)
