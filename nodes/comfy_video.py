"""ComfyUI's core VIDEO type, in and out: the only module of the pack that touches `comfy_api`.

Out (Video Encode): inside ComfyUI, comfy_api's own `VideoFromFile` of the file written, so core nodes (Save Video,
Get Video Components, ...) take it; a `VideoFromComponents` of the frames for outputs FFmpeg cannot read back (a
PNG sequence is a folder, animated WebP has no FFmpeg decoder). Headless (no ComfyUI), `FileVideo` and
`ComponentsVideo`: the few methods of those classes that the pack's Load Video uses, so VIDEO -> Load Video
works without ComfyUI too.

In (Load Video): a VIDEO from anywhere (core Load Video / Create Video, our Video Encode, another pack) becomes a
source `pipelines_core.video.decode.load_video` reads: its stream source (a path or a BytesIO, decoded frame by
frame, never whole) or, for a clip that only exists as tensors, its components.

comfy_api is imported only inside ComfyUI (or when ComfyUI handed us one of its objects, so it is loaded
already): headless it may be absent, and importing it from a checkout would drag in ComfyUI's command-line
parsing. Inside ComfyUI an ImportError is a real error and propagates.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import torch

from . import comfy_bridge
from ..pipelines_core.video.decode import Clip, ffmpeg_reads


# ---- headless stand-ins ---------------------------------------------------------------------------------

@dataclass
class VideoComponents:
    """Field for field what comfy_api's `Types.VideoComponents` holds."""

    images: torch.Tensor
    frame_rate: Fraction
    audio: Optional[dict] = None
    metadata: Optional[dict] = None


class FileVideo:
    """Headless VIDEO of a written file: comfy_api's `VideoFromFile` as far as Load Video uses it."""

    def __init__(self, path: str):
        self._path = path

    def get_stream_source(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"FileVideo({self._path!r})"


class ComponentsVideo:
    """Headless VIDEO of frames in memory: comfy_api's `VideoFromComponents` as far as Load Video uses it.

    No get_stream_source: comfy_api's would encode the whole clip into memory, and Load Video reads the
    components instead.
    """

    def __init__(self, components: VideoComponents):
        self._components = components

    def get_components(self) -> VideoComponents:
        return self._components

    def __repr__(self) -> str:
        images = self._components.images
        return f"ComponentsVideo({images.shape[0]} frames, {float(self._components.frame_rate):g} fps)"


# ---- out: Video Encode ----------------------------------------------------------------------------------

def encoded_video(path: str, frames: Optional[torch.Tensor], fps: float, audio: Optional[dict],
                  image_sequence: bool) -> Any:
    """The VIDEO output for a file (or folder) Video Encode wrote from `frames` at `fps` with `audio`; `frames`
    may be None when the file itself is the VIDEO (it is only needed for what FFmpeg cannot read back)."""
    as_file = not image_sequence and ffmpeg_reads(path)
    # The same rational the encoder wrote (29.97 -> 2997/100), not the float's exact binary fraction.
    rate = Fraction(fps).limit_denominator(1001)
    if not as_file and frames is None:
        raise ValueError(f"Video Encode: {os.path.basename(path)} cannot be read back as a VIDEO without its frames")
    images = frames[..., :3] if frames is not None else None  # the file has no alpha either
    if comfy_bridge.in_comfyui():
        from comfy_api.latest import InputImpl, Types

        if as_file:
            return InputImpl.VideoFromFile(path)
        return InputImpl.VideoFromComponents(Types.VideoComponents(images=images, frame_rate=rate, audio=audio))
    if as_file:
        return FileVideo(path)
    return ComponentsVideo(VideoComponents(images=images, frame_rate=rate, audio=audio))


# ---- in: Load Video -------------------------------------------------------------------------------------

def _from_comfy_api(video: Any) -> bool:
    return any(cls.__module__.startswith("comfy_api.") for cls in type(video).__mro__)


def _stream_is_a_reencode(video: Any) -> bool:
    """Whether `get_stream_source()` would encode the whole clip into a BytesIO first.

    That is comfy_api's default `VideoInput.get_stream_source` (it calls save_to), which `VideoFromComponents`
    inherits and which cannot even write to a BytesIO without a format. Its components are then the better
    source: already decoded, and not lossy h264.
    """
    if not hasattr(video, "get_stream_source"):
        return True
    if not _from_comfy_api(video):
        return False
    from comfy_api.latest import Input  # loaded already: the object comes from it

    return type(video).get_stream_source is Input.Video.get_stream_source


def video_source(video: Any) -> str | io.IOBase | Clip:
    """What `load_video` reads for a VIDEO: its stream source (a path or a BytesIO), else its components."""
    if not _stream_is_a_reencode(video):
        source = video.get_stream_source()
        if isinstance(source, (str, os.PathLike)) or hasattr(source, "read"):
            return source
        raise TypeError(f"The VIDEO input's stream source is a {type(source).__name__}: expected a path or a "
                        "BytesIO (comfy_api's VideoInput contract).")
    if not hasattr(video, "get_components"):
        raise TypeError(f"The VIDEO input ({type(video).__name__}) has neither a stream source nor components: "
                        "connect a VIDEO from Load Video, Create Video or Video Encode.")
    components = video.get_components()
    return Clip(components.images, components.frame_rate, components.audio)
