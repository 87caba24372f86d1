"""Video Encode: write frames (and audio) to a video file and show it in the canvas."""

from __future__ import annotations

import os

from . import comfy_bridge, comfy_video
from ..pipelines_core.video_encode import check_writable, encode_video, format_spec, list_formats, output_folder


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
                       "cannot read back, pass their frames instead of the file.")
    FUNCTION = "encode"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "Frames to write."}),
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
            "optional": {
                "audio": ("AUDIO", {"tooltip": "Audio to mux in (e.g. Load Video's), trimmed to the video's length."}),
                "video_info": ("VE_VIDEO_INFO", {"tooltip": "Load Video's facts; gives the fps when fps is 0."}),
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

    def encode(self, frames, fps, format, quality, filename_prefix, audio=None, video_info=None):
        if fps <= 0:
            fps = float(video_info["fps"]) if video_info else 8.0
        root = comfy_bridge.output_directory()
        path = encode_video(frames, root, filename_prefix, fps, format=format,
                            quality=None if quality < 0 else quality, audio=audio,
                            progress=comfy_bridge.progress("Video Encode"))
        rel = os.path.relpath(path, root)
        subfolder, filename = os.path.split(rel)
        preview = {"filename": filename, "subfolder": subfolder, "type": "output"}
        spec = format_spec(format)
        if spec.get("image_sequence"):
            first = sorted(os.listdir(path))[0]
            preview = {"filename": first, "subfolder": rel, "type": "output"}
        # The VIDEO holds what was written; a PNG sequence (stills, no audio track) keeps the audio beside its frames.
        keep_audio = spec["audio_codec"] is not None or spec["image_sequence"]
        video = comfy_video.encoded_video(path, frames, fps, audio if keep_audio else None, spec["image_sequence"])
        return {"ui": {"images": [preview], "animated": (True,)}, "result": (path, video)}
