"""Load Video: a clip (a file, a folder of images, or a VIDEO) as ComfyUI IMAGE frames, its facts, and its audio."""

from __future__ import annotations

import os

from . import comfy_bridge, comfy_video
from ..pipelines_core.video.decode import (VideoStream, collect, folder_fingerprint, image_sequence, is_image_folder,
                                       open_video)

ASSETS = comfy_bridge.ASSETS
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".m4v", ".webp")


def bundled_videos() -> list[str]:
    return sorted(f for f in os.listdir(ASSETS) if f.lower().endswith(VIDEO_EXTENSIONS)) if os.path.isdir(ASSETS) else []


def input_videos() -> list[str]:
    """Videos in ComfyUI's input folder, and its subfolders that hold frames (listed as 'name/'): the canvas
    can only pick what the list offers."""
    folder = comfy_bridge.input_directory()
    if not folder or not os.path.isdir(folder):
        return []
    names = os.listdir(folder)
    files = sorted(f for f in names if f.lower().endswith(VIDEO_EXTENSIONS))
    folders = sorted(f + "/" for f in names if is_image_folder(os.path.join(folder, f)))
    return files + folders


def resolve_video(name: str) -> str:
    """A path as given, a file or image folder in ComfyUI's input folder, or a clip bundled with the pack."""
    if not name:
        raise ValueError("Load Video: no video chosen; pick a file or give a path")
    candidates = [os.path.expanduser(name)]
    folder = comfy_bridge.input_directory()
    if folder:
        candidates.append(os.path.join(folder, name))
    candidates.append(os.path.join(ASSETS, name))
    for path in candidates:
        if os.path.isfile(path) or os.path.isdir(path):  # a folder is an image sequence; load_video checks it
            return path
    raise FileNotFoundError(f"Load Video: video {name!r} not found; give an existing file or image folder, "
                            "or upload the file")


def fingerprint(path: str) -> str:
    """Changes when the file changes or, for an image folder, when a frame is added, removed or rewritten."""
    return folder_fingerprint(path) if os.path.isdir(path) else comfy_bridge.file_fingerprint(path)


_UNLINKED = object()  # ComfyUI passes a linked input to VALIDATE_INPUTS as None, and leaves an unlinked one out


# ---- shared with Load Video as Latents: one declaration of the source and selection inputs ---------------------

def source_widgets() -> dict:
    """The source and selection/resize widgets, in Load Video's order (saved workflows are positional)."""
    return {
        "video": (bundled_videos() + input_videos(), {
            "video_upload": True,
            "tooltip": "A video from ComfyUI's input folder, a clip bundled with the pack, a file path, or "
                       "a folder of images (png, jpg, webp, bmp, tif, exr; one per frame, in natural name "
                       "order). Ignored while the video_input socket is connected.",
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


def source_sockets() -> dict:
    """The optional sockets: a VIDEO to load instead, and an image folder's fps."""
    # New inputs go last, and as sockets: saved workflows store widget values by position, and the upload
    # button's value is stored after every other widget, so a new widget would take that value.
    return {
        "video_input": ("VIDEO", {
            "tooltip": "A VIDEO (core Load Video, Create Video, or Video Encode's video output). When "
                       "connected it is loaded instead of the video chosen above, with its own fps and audio.",
        }),
        "fps": ("FLOAT", {
            "default": 24.0, "min": 0.01, "max": 240.0, "step": 0.01, "forceInput": True,
            "tooltip": "Frame rate of an image folder, which has none of its own (default 24). "
                       "Video files and VIDEO inputs keep their own rate.",
        }),
    }


def validate_source(video, video_input=_UNLINKED):
    """VALIDATE_INPUTS of a loader: True, or the message saying why ``video`` cannot be read."""
    if video_input is not _UNLINKED:
        return True  # a connected VIDEO replaces the chosen file, which may then be anything
    # Paths, image folders and bundled clips are valid too, not only the listed input files.
    try:
        path = resolve_video(video)
        if os.path.isdir(path):
            image_sequence(path)  # a folder must hold frames
    except (OSError, ValueError) as e:
        return str(e)
    return True


def source_changed(video) -> str:
    """IS_CHANGED of a loader. A connected VIDEO needs nothing here: ComfyUI's cache key already covers what is
    upstream."""
    try:
        return fingerprint(resolve_video(video))
    except (OSError, ValueError):  # not there (any more): validation reports it
        return ""


def open_source(video, frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit,
                video_input=None, fps=24.0, desc="Load Video") -> VideoStream:
    """The chosen clip (the VIDEO when connected) opened as a stream with the widgets' selection and size."""
    source = comfy_video.video_source(video_input) if video_input is not None else resolve_video(video)
    return open_video(
        source, frame_cap=frame_cap, skip_first=skip_first, every_nth=every_nth,
        target_fps=target_fps, width=width, height=height, multiple_of=int(multiple_of), fit=fit,
        progress=comfy_bridge.progress(desc), fps=fps,
    )


class VE_LoadVideo:
    DESCRIPTION = (
        "Load a video as frames (IMAGE), its facts (fps, size, count) and its audio: a video file, a folder of "
        "images (one per frame, in natural name order), or a VIDEO from another node. "
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
        return {"required": source_widgets(), "optional": source_sockets()}

    @classmethod
    def VALIDATE_INPUTS(cls, video, video_input=_UNLINKED):
        return validate_source(video, video_input)

    @classmethod
    def IS_CHANGED(cls, video, **_):
        return source_changed(video)

    def load(self, video, frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit,
             video_input=None, fps=24.0):
        stream = open_source(video, frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit,
                             video_input, fps)
        frames, info, audio = collect(stream)
        return (frames, info, audio)
