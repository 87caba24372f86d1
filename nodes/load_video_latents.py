"""Load Video as Latents: a clip straight to its VAE latents, a chunk of frames at a time (long clips)."""

from __future__ import annotations

from . import comfy_bridge
from .load_video import _UNLINKED, open_source, source_changed, source_sockets, source_widgets, validate_source
from ..pipelines_core.models.model import encode_frame_stream, posterior_generators

CHUNK_FRAMES = 8  # frames decoded into pixels at once; the VAE takes them 4 at a time, as encode_frames does


class VE_LoadVideoLatents:
    DESCRIPTION = (
        "Load a video straight to its latents (LATENT), its facts and its audio, decoding and VAE-encoding a few "
        "frames at a time: the clip is never in memory as pixels, so a long clip needs memory for its latents "
        "only (a 2,000-frame 1080p clip: ~1 GB of latents, where its IMAGE would need ~50 GB). Connect the "
        "latent to the Cross-Frame Sampler's latent input, and its latent output to Video Encode's."
    )
    CATEGORY = "video edit/io"
    RETURN_TYPES = ("LATENT", "VE_VIDEO_INFO", "AUDIO")
    RETURN_NAMES = ("latent", "video_info", "audio")
    OUTPUT_TOOLTIPS = ("The frames' VAE latents, ComfyUI convention (unscaled, on the CPU): a posterior sample per "
                       "frame drawn with seed + frame index.",
                       "fps, source size and frame count, for Video Encode.",
                       "The clip's audio over the loaded span (None if the clip has none).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        # Load Video's widgets in Load Video's order, then this node's own. The upload button's value is stored
        # after every widget; model is a socket and takes no slot.
        required = dict(source_widgets())
        required["model"] = ("VE_MODEL", {"tooltip": "From Load Model (or LoRA Apply): its VAE encodes the frames."})
        required["seed"] = ("INT", {
            "default": 0, "min": 0, "max": 2**53 - 1,
            "tooltip": "Seed of the VAE posterior sample: frame f draws with seed + f, as the Cross-Frame Sampler "
                       "does when it encodes images. Set it to the sampler's seed to reproduce an in-memory run "
                       "exactly (Load Video -> Sampler images, same seed).",
        })
        return {"required": required, "optional": source_sockets()}

    @classmethod
    def VALIDATE_INPUTS(cls, video, video_input=_UNLINKED):
        return validate_source(video, video_input)

    @classmethod
    def IS_CHANGED(cls, video, **_):
        return source_changed(video)

    def load(self, video, frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit, model,
             seed, video_input=None, fps=24.0):
        stream = open_source(video, frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit,
                             video_input, fps, desc="Load Video as Latents")
        comfy_bridge.load_for_use(model)
        samples = encode_frame_stream(model, stream.batches(CHUNK_FRAMES), posterior_generators(seed))
        return ({"samples": samples}, stream.info, stream.audio)
