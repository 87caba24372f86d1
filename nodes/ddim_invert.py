"""DDIM Invert: a clip's latents run back up the noise schedule (and, optionally, what the UNet saw)."""

from __future__ import annotations

from . import comfy_bridge
from ..pipelines_core.attention import RULES
from ..pipelines_core.attention.store import RecordSpec
from ..pipelines_core.sampling.inversion import invert_video

RECORD_CHOICES = {
    "latents only": RecordSpec(),
    "attention maps (FateZero)": RecordSpec(self_probs=True, cross_probs=True),
    "self-attention Q/K": RecordSpec(qk=True),
}


class VE_DDIMInvert:
    DESCRIPTION = (
        "Deterministic DDIM inversion of the frames under a source prompt: the latents at every sampling "
        "timestep (x0 ... x_T), optionally attention maps for FateZero, within a memory budget. "
        "Re-running with the same clip, model, prompt and steps reuses the cached result. "
        "Shows the reconstruction PSNR when asked."
    )
    CATEGORY = "video edit/inversion"
    RETURN_TYPES = ("VE_INVERSION", "FLOAT")
    RETURN_NAMES = ("inversion", "reconstruction_psnr")
    OUTPUT_TOOLTIPS = ("Inverted latents keyed by timestep (+ recorded attention), for the sampler and injector.",
                       "PSNR (dB) of invert -> sample back vs the input frames (0 when not measured).")
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("VE_MODEL", {"tooltip": "From Load Model."}),
                "frames": ("IMAGE", {"tooltip": "The source clip (sizes a multiple of 8)."}),
                "source_prompt": ("STRING", {"multiline": True, "default": "",
                                             "tooltip": "Describes the source clip (empty works for PnP/TokenFlow)."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                                  "tooltip": "Inversion steps; the sampler must use the same number."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Guidance during inversion; 1 is exact-ish (recommended)."}),
                "record": (list(RECORD_CHOICES), {"default": "latents only",
                                                  "tooltip": "What to keep besides latents: FateZero needs the "
                                                             "attention maps (fp16, capped by max_tokens and the budget)."}),
                "max_tokens": ("INT", {"default": 1024, "min": 1, "max": 1 << 20,
                                       "tooltip": "Record only attention layers with at most this many tokens "
                                                  "(FateZero: 32x32 = 1024)."}),
                "budget_gb": ("FLOAT", {"default": 4.0, "min": 0.01, "max": 1024.0, "step": 0.5,
                                        "tooltip": "Memory budget for recorded attention; refused before any step "
                                                   "if the request needs more."}),
                "storage": (["cpu", "disk"], {"default": "cpu",
                                              "tooltip": "Keep recordings in RAM, or on disk (temp folder)."}),
                "attention": (list(RULES), {"default": "none",
                                            "tooltip": "Cross-frame rule during inversion; FateZero's recorded maps need "
                                                       "the sampler to use the same rule."}),
                "chunk_size": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "Frames inverted together."}),
                "null_text": ("BOOLEAN", {"default": False,
                                          "tooltip": "Null-text inversion: optimise the unconditional embedding per step "
                                                     "so CFG sampling reconstructs the clip (slower)."}),
                "null_text_cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                                            "tooltip": "The CFG the sampler will use (null-text only)."}),
                "measure_psnr": ("BOOLEAN", {"default": False,
                                             "tooltip": "Sample back with the source prompt and report the PSNR."}),
            },
            "optional": {
                "control": ("VE_CONTROL", {"tooltip": "ControlNet Condition(s) on these frames: they steer every "
                                                      "inversion step (RAVE inverts so), whatever their start/end."}),
            },
        }

    def invert(self, model, frames, source_prompt, steps, cfg, record, max_tokens, budget_gb, storage, attention,
               chunk_size, null_text, null_text_cfg, measure_psnr, control=None):
        spec = RECORD_CHOICES[record]
        spec = RecordSpec(spec.self_probs, spec.cross_probs, spec.qk, spec.features, max_tokens, storage)
        comfy_bridge.load_for_use(model, control)
        inversion = invert_video(
            model, frames, prompt=source_prompt, steps=steps, cfg=null_text_cfg if null_text else cfg, record=spec,
            budget_bytes=int(budget_gb * 2**30), null_text=null_text, measure=measure_psnr, attention=attention,
            chunk_size=chunk_size, progress=comfy_bridge.progress("DDIM Invert"), control=control,
        )
        psnr = float(inversion.reconstruction_psnr or 0.0)
        text = f"reconstruction PSNR {psnr:.2f} dB" if measure_psnr else repr(inversion)
        return {"ui": {"text": [text]}, "result": (inversion, psnr)}
