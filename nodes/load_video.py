"""Load Video: a clip as ComfyUI IMAGE frames, its facts, and its audio."""

from __future__ import annotations

import os

from . import comfy_bridge
from ..pipelines_core.video_io import load_video

ASSETS = comfy_bridge.ASSETS
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".m4v", ".webp")


def bundled_videos() -> list[str]:
    return sorted(f for f in os.listdir(ASSETS) if f.lower().endswith(VIDEO_EXTENSIONS)) if os.path.isdir(ASSETS) else []


def input_videos() -> list[str]:
    folder = comfy_bridge.input_directory()
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(VIDEO_EXTENSIONS))


def resolve_video(name: str) -> str:
    """A path as given, a file in ComfyUI's input folder, or a clip bundled with the pack."""
    if not name:
        raise ValueError("Load Video: no video chosen; pick a file or give a path")
    candidates = [os.path.expanduser(name)]
    folder = comfy_bridge.input_directory()
    if folder:
        candidates.append(os.path.join(folder, name))
    candidates.append(os.path.join(ASSETS, name))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"Load Video: video {name!r} not found; give an existing path or upload the file")


class VE_LoadVideo:
    DESCRIPTION = (
        "Load a video as frames (IMAGE), its facts (fps, size, count) and its audio. "
        "Frames are resized to a multiple of 8 so a diffusion model can take them."
    )
    CATEGORY = "video edit/io"
    RETURN_TYPES = ("IMAGE", "VE_VIDEO_INFO", "AUDIO")
    RETURN_NAMES = ("frames", "video_info", "audio")
    OUTPUT_TOOLTIPS = ("The frames, (frames, height, width, 3) in 0..1.",
                       "fps, source size and frame count, for Video Encode.",
                       "The clip's audio over the loaded span (None if the clip has none).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video": (bundled_videos() + input_videos(), {
                    "video_upload": True,
                    "tooltip": "A video from ComfyUI's input folder, a clip bundled with the pack, or a file path.",
                }),
                "frame_cap": ("INT", {"default": 16, "min": 0, "max": 100000,
                                      "tooltip": "Keep at most this many frames (0 = all)."}),
                "skip_first": ("INT", {"default": 0, "min": 0, "max": 1000000,
                                       "tooltip": "Skip this many frames at the start."}),
                "every_nth": ("INT", {"default": 1, "min": 1, "max": 1000,
                                      "tooltip": "Keep every n-th frame (after skip and fps resampling)."}),
                "target_fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 240.0, "step": 0.01,
                                         "tooltip": "Resample to this frame rate by picking frames (0 = keep the clip's rate)."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                                  "tooltip": "Target width (0 = from height and aspect, or the clip's)."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                                   "tooltip": "Target height (0 = from width and aspect, or the clip's)."}),
                "multiple_of": (["8", "64"], {"default": "8",
                                              "tooltip": "Round the size down to a multiple of this (8 for SD; 64 for some models)."}),
                "fit": (["crop", "pad"], {"default": "crop",
                                          "tooltip": "Keep aspect by centre-cropping to the size, or by padding with black."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, video):
        # Paths and bundled clips are valid too, not only the listed input files.
        try:
            resolve_video(video)
        except (FileNotFoundError, ValueError) as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(cls, video, **_):
        try:
            return comfy_bridge.file_fingerprint(resolve_video(video))
        except (FileNotFoundError, ValueError):
            return ""

    def load(self, video, frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit):
        frames, info, audio = load_video(
            resolve_video(video), frame_cap=frame_cap, skip_first=skip_first, every_nth=every_nth,
            target_fps=target_fps, width=width, height=height, multiple_of=int(multiple_of), fit=fit,
            progress=comfy_bridge.progress("Load Video"),
        )
        return (frames, info, audio)
