"""Cross-Frame Sampler: denoise all frames of a clip together under one prompt."""

from __future__ import annotations

from . import comfy_bridge
from ..pipelines_core.attention import RULES
from ..pipelines_core.models.model import decode_latents
from ..pipelines_core.sampling.settings import ATTENTION_LAYERS, NOISE_MODES, SamplerSettings
from ..pipelines_core.sampling.schedulers import SCHEDULERS
from ..pipelines_core.methods.instruct_pix2pix import instruct_edit
from ..pipelines_core.methods.temporal_guidance import guided_edit


class VE_CrossFrameSampler:
    DESCRIPTION = (
        "Edit (images or a latent connected: SDEdit with the given strength; or an inversion) or generate (nothing "
        "connected: from noise) a clip, holding frames together with cross-frame self-attention; a mask limits the "
        "edit to a region. With an instruction model (InstructPix2Pix) the prompt is the instruction and the images "
        "(or latent) condition every step. Outputs the frames and their latents."
    )
    CATEGORY = "video edit/sampling"
    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("frames", "latent")
    OUTPUT_TOOLTIPS = ("The edited frames.", "Their latents, ComfyUI convention (unscaled).")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("VE_MODEL", {"tooltip": "From Load Model (or LoRA Apply)."}),
                "prompt": ("STRING", {"multiline": True, "default": "a watercolor painting",
                                      "tooltip": "What the edited clip should show."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "What to steer away from (the unconditional half of CFG)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**53 - 1,
                                 "tooltip": "Noise seed; frame f uses seed + f unless noise is shared."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Denoising steps of the full schedule."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale (1 = no guidance, half the compute)."}),
                "scheduler": (list(SCHEDULERS), {"default": "ddim",
                                                 "tooltip": "Deterministic samplers: DDIM, Euler, DPM++ 2M."}),
                "strength": ("FLOAT", {"default": 0.6, "min": 0.01, "max": 1.0, "step": 0.01,
                                       "tooltip": "With images: how much of the schedule to re-run (SDEdit). "
                                                  "Low keeps the clip, high follows the prompt."}),
                "noise": (list(NOISE_MODES), {"default": "per_frame",
                                              "tooltip": "per_frame: independent noise per frame; shared: the same "
                                                         "noise for every frame (Text2Video-Zero, ControlVideo)."}),
                "attention": (list(RULES), {"default": "first+previous",
                                            "tooltip": "Which frames each frame's self-attention reads: none, the "
                                                       "first, the previous, first+previous (sparse-causal), all."}),
                "attention_layers": (list(ATTENTION_LAYERS), {"default": "all",
                                                              "tooltip": "Apply the rule in every self-attention layer, "
                                                                         "or only in the decoder (Rerender, Pix2Video)."}),
                "chunk_size": ("INT", {"default": 8, "min": 1, "max": 256,
                                       "tooltip": "Frames denoised together; the first frame joins every chunk as "
                                                  "anchor so chunks do not seam. Lower it if memory runs out."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Frames to edit. Leave unconnected to generate from noise."}),
                "inversion": ("VE_INVERSION", {"tooltip": "Start from DDIM Invert's latents (strength 1 = from x_T); "
                                                          "steps must match; needs ddim."}),
                "injection": ("VE_INJECTION", {"tooltip": "Attention Injector: what to inject from the inversion "
                                                          "(FateZero, Plug-and-Play, TokenFlow, Pix2Video)."}),
                "control": ("VE_CONTROL", {"tooltip": "ControlNet Condition(s)."}),
                "temporal": ("VE_TEMPORAL", {"tooltip": "Temporal Guidance: flow-based fusion, smoother, motion."}),
                # Socket-only inputs (no widget slot), so saved workflows' positional widget values still line up.
                "latent": ("LATENT", {"tooltip": "Start from these latents instead of encoding images (ComfyUI "
                                                 "convention, unscaled: e.g. this sampler's latent output), partly "
                                                 "noised by strength; frame count and size come from them. Its "
                                                 "noise_mask, if any, limits the edit like the mask input."}),
                "mask": ("MASK", {"tooltip": "Where to edit: 1 = edit, 0 = keep the source (images, latent or "
                                             "inversion). One mask per frame or one for all; any size, resized "
                                             "to the latent grid; soft values blend."}),
                "frame_count": ("INT", {"default": 8, "min": 1, "max": 4096,
                                        "tooltip": "Frames to generate when neither images nor a ControlNet "
                                                   "(whose hints give count and size) are connected."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                  "tooltip": "Width to generate when no images are connected (multiple of 8)."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                   "tooltip": "Height to generate when no images are connected (multiple of 8)."}),
                # Last on purpose: saved workflows store widget values by position, so a new widget goes at the end.
                "chunk_overlap": ("INT", {"default": 0, "min": 0, "max": 255,
                                          "tooltip": "Seamless chunks: frames shared by neighbouring chunks; "
                                                     "their predictions are blended at every step, so no "
                                                     "neighbouring frames are split between separately denoised "
                                                     "chunks (more overlap, more UNet calls). 0: chunks back to "
                                                     "back. Less than chunk_size; not with an injection."}),
                # Appended after chunk_overlap for the same reason: saved workflows keep their widget order.
                "image_guidance": ("FLOAT", {"default": 1.5, "min": 1.0, "max": 30.0, "step": 0.1,
                                             "tooltip": "Instruction models (InstructPix2Pix) only: how closely the "
                                                        "edit keeps to the source frames (cfg is the instruction's "
                                                        "guidance). Other models ignore it."}),
            },
            # To see whether anything reads the frames output: a long clip's pixels need not exist at all.
            "hidden": {"unique_id": "UNIQUE_ID", "graph": "PROMPT"},
        }

    def sample(self, model, prompt, negative_prompt, seed, steps, cfg, scheduler, strength, noise, attention,
               attention_layers, chunk_size, images=None, inversion=None, injection=None, control=None, temporal=None,
               latent=None, mask=None, frame_count=8, width=512, height=512, chunk_overlap=0, image_guidance=1.5,
               unique_id=None, graph=None):
        settings = SamplerSettings(
            prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, cfg=cfg, scheduler=scheduler,
            strength=strength, noise=noise, attention=attention, attention_layers=attention_layers,
            chunk_size=chunk_size, chunk_overlap=chunk_overlap,
        )
        # The widgets give the extent only when nothing connected does (the canvas greys them out then).
        connected = any(v is not None for v in (images, latent, inversion, injection, control))
        extent = {} if connected else {"frame_count": frame_count, "size": (height, width)}
        comfy_bridge.load_for_use(model, control)
        # An instruction model reads the source frames beside the noisy latent: its own recipe, same inputs.
        edit = instruct_edit if model.is_instruction else guided_edit
        extra = {"image_guidance": image_guidance} if model.is_instruction else {}
        latents = edit(
            model, settings, temporal, images=images, **extent, **extra,
            progress=comfy_bridge.progress("Cross-Frame Sampler"), control=control, inversion=inversion,
            injection=injection, latent=latent, mask=mask,
        )
        samples = {"samples": model.unscaled(latents).float().cpu()}
        if not frames_are_read(graph, unique_id):
            # Only the latent is used (e.g. Video Encode decodes it a few frames at a time): decoding the whole
            # clip here would hold every frame in pixels, the memory a streamed long clip must not need.
            return (None, samples)
        return (decode_latents(model, latents, progress=comfy_bridge.progress("VAE decode")), samples)


def frames_are_read(graph, node_id) -> bool:
    """Whether any node of the running prompt links to this node's frames output (slot 0). Without the
    prompt (a direct call) assume it is."""
    if not isinstance(graph, dict) or node_id is None:
        return True
    return any(isinstance(v, (list, tuple)) and len(v) == 2 and str(v[0]) == str(node_id) and v[1] == 0
               for entry in graph.values() for v in (entry.get("inputs") or {}).values())
