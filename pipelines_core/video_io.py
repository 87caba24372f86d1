"""Load a video as IMAGE frames (+ AUDIO) with PyAV; encoding lives in ``video_encode``.

Frames are decoded as a stream and only the selected ones are kept, so a long clip with a frame cap or
a low target fps never sits in memory whole.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import av
import cv2
import numpy as np
import torch
from PIL import Image, ImageSequence

from .video_encode import encode_video, format_spec, list_formats

__all__ = ["load_video", "encode_video", "list_formats", "format_spec", "select_frames",
           "resample_copies", "output_size"]

T = TypeVar("T")
HALF = Fraction(1, 2)


# ---- which frames: skip -> resample to target fps -> every n-th -> cap --------------------------------

def resample_copies(j: int, ratio: Fraction) -> int:
    """How many output frames show source frame ``j`` when resampling by ``ratio = target_fps / source_fps``.

    Output frame k shows the source frame nearest its time, a tie going to the earlier frame:
    j = ceil(k / ratio - 1/2). So j is shown for every integer k >= 0 in ((j - 1/2) * ratio, (j + 1/2) * ratio]:
    once per source frame at ratio 1, every other frame at 1/2, twice each at 2.
    """
    first = max(0, math.floor((j - HALF) * ratio) + 1)
    last = math.floor((j + HALF) * ratio)
    return max(0, last - first + 1)


def select_frames(items: Iterable[T], skip_first: int = 0, ratio: Fraction = Fraction(1),
                  every_nth: int = 1, frame_cap: int = 0) -> Iterator[T]:
    """Yield the selected items, pulling no more from ``items`` than needed (it may be a decoder)."""
    kept = resampled = 0
    for i, item in enumerate(items):
        if i < skip_first:
            continue
        for _ in range(resample_copies(i - skip_first, ratio)):
            take = resampled % every_nth == 0
            resampled += 1
            if take:
                yield item
                kept += 1
                if kept == frame_cap:
                    return


def _rate_ratio(target_fps: float, source_fps: Fraction) -> Fraction:
    """target / source; exactly 1 when off or when the target only restates the source (29.97 vs 30000/1001)."""
    if target_fps <= 0 or abs(target_fps - source_fps) < 1e-3 * source_fps:
        return Fraction(1)
    return Fraction(target_fps).limit_denominator(1001) / source_fps


# ---- what size: target -> multiple of N -> crop or pad ---------------------------------------------------

def output_size(src_w: int, src_h: int, width: int = 0, height: int = 0, multiple_of: int = 8) -> tuple[int, int]:
    """Target (w, h): a missing side follows the source aspect; both rounded down to ``multiple_of``."""
    if width <= 0 and height <= 0:
        width, height = src_w, src_h
    elif width <= 0:
        width = round(height * src_w / src_h)
    elif height <= 0:
        height = round(width * src_h / src_w)
    return (max(multiple_of, width // multiple_of * multiple_of),
            max(multiple_of, height // multiple_of * multiple_of))


def _scaled_size(src_w: int, src_h: int, out_w: int, out_h: int, fit: str, keep_scale: bool) -> tuple[int, int]:
    """Size to resize to before cropping/padding to (out_w, out_h), aspect kept."""
    if keep_scale and fit == "crop":
        return src_w, src_h  # source size asked for: only trim the remainder, no resampling
    pick = max if fit == "crop" else min  # cover the target, or fit inside it
    scale = pick(out_w / src_w, out_h / src_h)
    w, h = round(src_w * scale), round(src_h * scale)
    if fit == "crop":
        return max(w, out_w), max(h, out_h)
    return min(w, out_w), min(h, out_h)


def fit_frame(rgb: np.ndarray, scaled: tuple[int, int], out: tuple[int, int], fit: str) -> np.ndarray:
    """Resize to ``scaled`` (w, h), then centre-crop (or centre-pad with black) to ``out`` (w, h)."""
    h, w = rgb.shape[:2]
    if (w, h) != scaled:
        shrinking = scaled[0] * scaled[1] < w * h
        rgb = cv2.resize(rgb, scaled, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    h, w = rgb.shape[:2]
    out_w, out_h = out
    if fit == "crop":
        top, left = (h - out_h) // 2, (w - out_w) // 2
        return rgb[top:top + out_h, left:left + out_w]
    top, left = (out_h - h) // 2, (out_w - w) // 2
    return cv2.copyMakeBorder(rgb, top, out_h - h - top, left, out_w - w - left, cv2.BORDER_CONSTANT, value=0)


# ---- sources: PyAV, and Pillow for animated WebP (FFmpeg's WebP decoder reads stills only) -------------

@dataclass
class _Source:
    fps: Fraction
    width: int
    height: int
    frame_count: int | None  # from the header; None when the container does not say
    estimated_count: int | None  # header count, else duration x fps (for progress totals)
    frames: Iterator[tuple[np.ndarray, float]]  # (RGB uint8, time in seconds)
    close: Callable[[], None]


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"Cannot read {path.name} as a video ({err}): choose a video file such as .mp4, .webm or .mkv.")


def _pyav_frames(container, stream, fps: Fraction, path: Path) -> Iterator[tuple[np.ndarray, float]]:
    try:
        for i, frame in enumerate(container.decode(stream)):
            yield frame.to_ndarray(format="rgb24"), frame.time if frame.time is not None else float(i / fps)
    except av.FFmpegError as err:
        raise _unreadable(path, err) from None


def _pyav_rate(container, stream) -> Fraction:
    if container.format.name == "gif" and stream.frames and stream.duration:
        # GIF delays are whole centiseconds, so FFmpeg's rate guess from the first delay is off (12 -> 12.5).
        return Fraction(stream.frames) / (stream.duration * stream.time_base)
    return Fraction(stream.average_rate or stream.guessed_rate or 24)


def _frame_ms(frame: Image.Image) -> float:
    frame.load()  # Pillow fills in a WebP frame's duration only once the frame is decoded
    return frame.info.get("duration", 0)


def _pillow_source(path: Path) -> _Source:
    try:
        image = Image.open(path)
    except (OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    durations = [_frame_ms(frame) for frame in ImageSequence.Iterator(image)]
    mean_ms = sum(durations) / len(durations)
    fps = Fraction(1000 / mean_ms).limit_denominator(1001) if mean_ms > 0 else Fraction(24)

    def frames():
        start = 0.0
        for frame, ms in zip(ImageSequence.Iterator(image), durations):
            yield np.array(frame.convert("RGB")), start
            start += ms / 1000

    return _Source(fps, image.width, image.height, len(durations), len(durations), frames(), image.close)


def _open_source(path: Path) -> _Source:
    if path.is_dir():
        raise ValueError(f"{path} is a folder: choose a video file inside it.")
    if not path.is_file():
        raise FileNotFoundError(f"Video file not found: {path}. Check the path or upload the file.")
    try:
        container = av.open(str(path))
    except av.FFmpegError as err:
        raise _unreadable(path, err) from None
    if container.format.name == "webp_pipe":
        container.close()
        return _pillow_source(path)
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path.name} has no video stream: choose a file with video in it.")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    fps = _pyav_rate(container, stream)
    estimate = stream.frames or (round(container.duration / av.time_base * fps) if container.duration else None)
    return _Source(fps, stream.width, stream.height, stream.frames or None, estimate,
                   _pyav_frames(container, stream, fps, path), container.close)


def _estimated_total(source: _Source, skip_first: int, ratio: Fraction, every_nth: int, frame_cap: int) -> int:
    """Frames that will be kept, for progress; exact when the source frame count is known."""
    if source.estimated_count is None:
        return frame_cap
    return sum(1 for _ in select_frames(range(source.estimated_count), skip_first, ratio, every_nth, frame_cap))


# ---- audio ---------------------------------------------------------------------------------------------

def load_audio(path: str | os.PathLike, start: float, end: float) -> dict | None:
    """The first audio stream between ``start`` and ``end`` seconds as ComfyUI AUDIO, or None if there is none.

    Gaps (audio starting late or ending early) are filled with silence so the length matches the span.
    """
    try:
        container = av.open(str(path))
    except av.FFmpegError:
        return None  # e.g. animated WebP: no audio to read
    with container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate, channels = stream.rate, stream.channels
        first, last = round(start * rate), round(end * rate)
        out = np.zeros((channels, max(0, last - first)), np.float32)
        to_float = av.AudioResampler(format="fltp", layout=stream.layout, rate=rate)
        cursor = None  # absolute sample index of the next decoded sample
        for frame in container.decode(stream):
            if cursor is None:
                # Only the first timestamp places the audio; after it samples run on contiguously, because
                # containers such as Matroska round timestamps to 1 ms (tens of samples).
                cursor = round(frame.time * rate) if frame.time is not None else 0
            if cursor >= last:
                break
            chunk = np.concatenate([f.to_ndarray() for f in to_float.resample(frame)], axis=1)
            lo, hi = max(cursor, first), min(cursor + chunk.shape[1], last)
            if hi > lo:
                out[:, lo - first:hi - first] = chunk[:, lo - cursor:hi - cursor]
            cursor += chunk.shape[1]
    return {"waveform": torch.from_numpy(out).unsqueeze(0), "sample_rate": int(rate)}


# ---- the loader ----------------------------------------------------------------------------------------

def _check_args(frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit) -> None:
    if min(frame_cap, skip_first, width, height) < 0 or target_fps < 0:
        raise ValueError("frame_cap, skip_first, width, height and target_fps must be >= 0 (0 = off / source).")
    if every_nth < 1:
        raise ValueError(f"every_nth must be >= 1, got {every_nth}: use 1 to keep every frame.")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}: use 8 (or 64).")
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}.")


class _Counting:
    """Wraps an iterator, counting what it yields and noting when it runs out."""

    def __init__(self, items: Iterator[T]):
        self.items, self.count, self.exhausted = items, 0, False

    def __iter__(self):
        return self

    def __next__(self) -> T:
        try:
            item = next(self.items)
        except StopIteration:
            self.exhausted = True
            raise
        self.count += 1
        return item


def _to_image(kept: list[np.ndarray]) -> torch.Tensor:
    """uint8 frames -> IMAGE float32 (F, H, W, 3), freeing each uint8 frame once copied."""
    frames = torch.empty((len(kept), *kept[0].shape), dtype=torch.float32)
    for i in range(len(kept)):
        frames[i] = torch.from_numpy(kept[i]).float().div_(255)
        kept[i] = None
    return frames


def load_video(path: str | os.PathLike, frame_cap: int = 0, skip_first: int = 0, every_nth: int = 1,
               target_fps: float = 0.0, width: int = 0, height: int = 0, multiple_of: int = 8,
               fit: str = "crop", progress: Callable[[int, int], None] | None = None
               ) -> tuple[torch.Tensor, dict, dict | None]:
    """Decode the selected frames of a video -> (IMAGE (F, H, W, 3) float 0..1, info dict, AUDIO or None).

    Selection: skip ``skip_first`` frames, resample to ``target_fps`` (nearest source frame in time; 0 = off),
    keep every ``every_nth``, stop after ``frame_cap`` (0 = all). Size: see ``output_size``; ``fit`` "crop"
    covers the target and centre-crops, "pad" fits inside and pads with black.
    """
    _check_args(frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit)
    path = Path(path)
    source = _open_source(path)
    decoded = _Counting(source.frames)
    kept: list[np.ndarray] = []
    start_time = 0.0
    try:
        ratio = _rate_ratio(target_fps, source.fps)
        out = output_size(source.width, source.height, width, height, multiple_of)
        scaled = _scaled_size(source.width, source.height, *out, fit, keep_scale=width <= 0 and height <= 0)
        total = _estimated_total(source, skip_first, ratio, every_nth, frame_cap)
        for rgb, time in select_frames(decoded, skip_first, ratio, every_nth, frame_cap):
            start_time = time if not kept else start_time
            kept.append(fit_frame(rgb, scaled, out, fit))
            if progress is not None:
                progress(len(kept), max(total, len(kept)))
    finally:
        source.close()
    source_count = source.frame_count or (decoded.count if decoded.exhausted else None)
    if not kept:
        raise ValueError(f"No frames selected from {path.name} ({decoded.count} frames, skip_first={skip_first}): "
                         "lower skip_first or frame selection settings.")

    fps = source.fps * ratio / every_nth
    duration = float(len(kept) / fps)
    info = {
        "fps": float(fps), "source_fps": float(source.fps),
        "source_width": source.width, "source_height": source.height, "source_frame_count": source_count,
        "frame_count": len(kept), "width": out[0], "height": out[1], "duration": duration, "path": str(path),
    }
    audio = load_audio(path, start_time, start_time + duration)
    return _to_image(kept), info, audio
