"""Video Encode: write frames, or latents decoded as they are written, (and audio) to a video file and show it in
the canvas."""

from __future__ import annotations

import os


from . import comfy_bridge, comfy_video
from ..pipelines_core.models.model import decode_latent_stream
from ..pipelines_core.sampling.starts import latent_samples
from ..pipelines_core.video.encode import check_writable, encode_video, format_spec, list_formats, output_folder
from ..pipelines_core.video.decode import ffmpeg_reads, load_video


class VE_VideoEncode:
    DESCRIPTION = (
        "Write frames to a video (h264 mp4 by default; h265, webm, gif, webp, png sequence...) with the clip's audio. "
        "Never overwrites: each run gets the next numbered file."
    )
    CATEGORY = "video edit/io"
    # VIDEO is appended last: links in saved workflows name outputs by slot number.
    RETURN_TYPES = ("STRING", "VIDEO")
    RETURN_NAMES = ("path", "video")
    OUTPUT_TOOLTIPS = ("Full path of the file (or folder, for image sequences) written.",
                       "The video written, with its fps and audio, as ComfyUI's VIDEO: for core Save Video / Get "
                       "Video Components or this pack's Load Video. PNG sequences and animated WebP, which FFmpeg "
                       "cannot read back, pass their frames instead of the file: held in memory, also when "
                       "encoding from a latent (read back from what was written), so for long clips pick a video "
                       "format (h264, h265, webm, ffv1), whose VIDEO is the file.")
    FUNCTION = "encode"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 240.0, "step": 0.01,
                                  "tooltip": "Frame rate; 0 = the rate in video_info (or 8 if none is connected)."}),
                "format": (list_formats(), {"default": "h264-mp4",
                                            "tooltip": "Container and codec; formats are JSON files in video_formats/."}),
                "quality": ("INT", {"default": -1, "min": -1, "max": 100,
                                    "tooltip": "Codec quality number (CRF for h264/h265/vp9, lower = better); "
                                               "-1 = the format's default."}),
                "filename_prefix": ("STRING", {"default": "video_edit/clip",
                                               "tooltip": "Name of the output (may include a subfolder); "
                                                          "a number is appended, existing files are never overwritten."}),
            },
            # frames is optional (a socket, so no widget moves): a latent and a model can stand in for it.
            "optional": {
                "frames": ("IMAGE", {"tooltip": "Frames to write. Or connect latent and model instead."}),
                "audio": ("AUDIO", {"tooltip": "Audio to mux in (e.g. Load Video's), trimmed to the video's length."}),
                "video_info": ("VE_VIDEO_INFO", {"tooltip": "Load Video's facts; gives the fps when fps is 0."}),
                # Socket-only, appended last: saved workflows' positional widget values still line up.
                "latent": ("LATENT", {"tooltip": "Latents to write instead of frames (ComfyUI convention, unscaled: "
                                                 "the Cross-Frame Sampler's latent output), VAE-decoded a few frames "
                                                 "at a time straight into the encoder, so a long clip is never in "
                                                 "memory as pixels. Needs model; leave frames unconnected."}),
                "model": ("VE_MODEL", {"tooltip": "The model whose VAE decodes latent (the sampler's model)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        """Refuse a prefix or an output folder that cannot be written now, before any sampling runs."""
        if filename_prefix is None:  # linked: known only when the graph runs
            return True
        root = comfy_bridge.output_directory()
        try:
            folder = output_folder(root, filename_prefix)
        except ValueError as err:  # absolute paths, '..', a trailing '/': the message names the input
            return str(err)
        try:
            check_writable(folder)
        except (FileExistsError, NotADirectoryError) as err:
            return (f"filename_prefix {filename_prefix!r}: the output folder {folder} cannot be made, a file is in "
                    f"the way ({err.filename or folder}): move that file or choose another filename_prefix.")
        except OSError as err:
            return (f"filename_prefix {filename_prefix!r}: cannot write to the output folder {folder} "
                    f"({err.strerror or type(err).__name__}): make it writable, or choose another output folder "
                    "(ComfyUI's --output-directory, video-edit's --output-dir).")
        return True

    # frames stays the first parameter, as it was when it was required: Python callers pass it by position.
    def encode(self, frames=None, fps=0.0, format="h264-mp4", quality=-1, filename_prefix="video_edit/clip",
               audio=None, video_info=None, latent=None, model=None):
        if frames is None and latent is None:
            raise ValueError("Video Encode: nothing to write: connect frames, or latent and model")
        if frames is not None and latent is not None:
            raise ValueError("Video Encode: connect either frames or latent, not both (one would be ignored)")
        if latent is not None and model is None:
            raise ValueError("Video Encode: a latent needs the model whose VAE decodes it: connect model "
                             "(the sampler's)")
        if fps <= 0:
            fps = float(video_info["fps"]) if video_info else 8.0
        root = comfy_bridge.output_directory()
        count = None
        if latent is not None:
            samples = latent_samples(latent, model.vae.config.latent_channels)
            count = samples.shape[0]
            comfy_bridge.load_for_use(model)
            frames = decode_latent_stream(model, samples, scaled=False)  # decoded as the encoder asks
        path = encode_video(frames, root, filename_prefix, fps, format=format,
                            quality=None if quality < 0 else quality, audio=audio,
                            progress=comfy_bridge.progress("Video Encode"), frame_count=count)
        rel = os.path.relpath(path, root)
        subfolder, filename = os.path.split(rel)
        preview = {"filename": filename, "subfolder": subfolder, "type": "output"}
        spec = format_spec(format)
        if spec.get("image_sequence"):
            first = sorted(os.listdir(path))[0]
            preview = {"filename": first, "subfolder": rel, "type": "output"}
        # The VIDEO holds what was written; a PNG sequence (stills, no audio track) keeps the audio beside its frames.
        keep_audio = spec["audio_codec"] is not None or spec["image_sequence"]
        if latent is not None:
            # Streamed: no frames in memory. A file FFmpeg reads back is the VIDEO; a PNG sequence or animated WebP
            # is not, and its VIDEO is its frames, read back from what was written (see the output's tooltip).
            as_file = not spec["image_sequence"] and ffmpeg_reads(path)
            frames = None if as_file else load_video(path, fps=fps)[0]
        video = comfy_video.encoded_video(path, frames, fps, audio if keep_audio else None, spec["image_sequence"])
        return {"ui": {"images": [preview], "animated": (True,)}, "result": (path, video)}
