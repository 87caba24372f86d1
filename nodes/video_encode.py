"""Video Encode: write frames (and audio) to a video file and show it in the canvas."""

from __future__ import annotations

import os

from . import comfy_bridge
from ..pipelines_core.video_encode import encode_video, format_spec, list_formats


class VE_VideoEncode:
    DESCRIPTION = (
        "Write frames to a video (h264 mp4 by default; h265, webm, gif, webp, png sequence...) with the clip's audio. "
        "Never overwrites: each run gets the next numbered file."
    )
    CATEGORY = "video edit/io"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the file (or folder, for image sequences) written.",)
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

    def encode(self, frames, fps, format, quality, filename_prefix, audio=None, video_info=None):
        if fps <= 0:
            fps = float(video_info["fps"]) if video_info else 8.0
        root = comfy_bridge.output_directory()
        path = encode_video(frames, root, filename_prefix, fps, format=format,
                            quality=None if quality < 0 else quality, audio=audio)
        rel = os.path.relpath(path, root)
        subfolder, filename = os.path.split(rel)
        preview = {"filename": filename, "subfolder": subfolder, "type": "output"}
        if format_spec(format).get("image_sequence"):
            first = sorted(os.listdir(path))[0]
            preview = {"filename": first, "subfolder": rel, "type": "output"}
        return {"ui": {"images": [preview], "animated": (True,)}, "result": (path,)}
