"""Load a video as IMAGE frames (+ AUDIO); encoding lives in ``video_encode``.

Sources: a video file or a binary stream (PyAV; Pillow for animated WebP), a folder of images (one per frame,
natural name order, at a frame rate you give), or a clip already in memory (``Clip``). Frames are pulled one at
a time and only the selected ones are turned into pixels, so a long clip with a frame cap or a low target fps
never sits in memory whole; ``open_video`` hands the selected frames over a batch at a time, so even a clip that
is kept whole need never be in memory as pixels (Load Video as Latents).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import av
import cv2
import numpy as np
import torch
from PIL import Image, ImageSequence


__all__ = ["load_video", "open_video", "collect", "VideoStream", "Clip", "select_frames",
           "resample_copies", "output_size", "IMAGE_EXTENSIONS", "image_files", "image_sequence", "is_image_folder",
           "folder_fingerprint", "read_image", "natural_key", "ffmpeg_reads"]

T = TypeVar("T")
HALF = Fraction(1, 2)
log = logging.getLogger(__name__)


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


# ---- sources -------------------------------------------------------------------------------------------
# Every source yields (read, time) pairs: `read()` gives the frame's pixels (RGB; uint8, or float32 in 0..1 for
# 16-bit and float images) and is called only for frames the selection keeps, before the next pair is pulled.
# So a skipped frame is never converted (video) or never even read from disk (image folder).

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".exr")
_EXTENSION_LIST = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
_DIGITS = re.compile(r"(\d+)")
# The pixel formats FFmpeg's EXR decoder gives for half/float data, read as they are (no swscale conversion,
# which is not exact for float formats).
_EXR_FLOAT_FORMATS = ("gbrpf32", "gbrapf32", "grayf32")


@dataclass
class Clip:
    """A clip already in memory: IMAGE frames (F, H, W, 3) in 0..1, its frame rate and its AUDIO (or None).

    For sources that are tensors rather than files (ComfyUI's VideoFromComponents): loading one applies the same
    selection, sizing and audio trimming as a file, with no encode/decode round trip.
    """

    images: torch.Tensor
    fps: float | Fraction
    audio: dict | None = None


@dataclass
class _Source:
    name: str  # for messages
    path: str | None  # for the info dict; None for a stream or a clip in memory
    fps: Fraction
    width: int
    height: int
    frame_count: int | None  # from the header; None when the container does not say
    estimated_count: int | None  # header count, else duration x fps (for progress totals)
    frames: Iterator[tuple[Callable[[], np.ndarray], float]]  # (read pixels, time in seconds)
    close: Callable[[], None]
    audio: Callable[[float, float], dict | None]  # (start, end) seconds -> AUDIO, or None if the source has none
    end_time: float | None = None  # when the video stream ends, as its header says (same clock as frame times)
    decode_errors: list = field(default_factory=list)  # a decoder error that ended the frames early, if any


def _unreadable(name: str, err: Exception) -> ValueError:
    return ValueError(f"Cannot read {name} as a video ({err}): choose a video file such as .mp4, .webm or .mkv.")


def _rewind(media) -> None:
    """A stream is read more than once (video, then audio): each reader starts at its beginning."""
    if hasattr(media, "seek"):
        media.seek(0)


def _pyav_frames(container, stream, fps: Fraction, name: str,
                 errors: list) -> Iterator[tuple[Callable[[], np.ndarray], float]]:
    i = -1
    try:
        for i, frame in enumerate(container.decode(stream)):
            time = frame.time if frame.time is not None else float(i / fps)
            yield partial(frame.to_ndarray, format="rgb24"), time
    except av.FFmpegError as err:
        if i < 0:
            raise _unreadable(name, err) from None
        # Frames were decoded, then the data broke off (a truncated file; whether FFmpeg reports it or just
        # stops depends on its threading): the frames stand, and load_video reports the error with the count.
        errors.append(err)


def _stream_end(container, stream) -> float | None:
    """When the video stream ends (seconds, the clock of frame.time), from the header; None if it does not say."""
    if stream.duration and stream.time_base:
        return float((stream.start_time or 0) * stream.time_base + stream.duration * stream.time_base)
    if container.duration:
        return ((container.start_time or 0) + container.duration) / av.time_base
    return None


def _pyav_rate(container, stream) -> Fraction:
    if container.format.name == "gif" and stream.frames and stream.duration:
        # GIF delays are whole centiseconds, so FFmpeg's rate guess from the first delay is off (12 -> 12.5).
        return Fraction(stream.frames) / (stream.duration * stream.time_base)
    return Fraction(stream.average_rate or stream.guessed_rate or 24)


def _frame_ms(frame: Image.Image) -> float:
    frame.load()  # Pillow fills in a WebP frame's duration only once the frame is decoded
    return frame.info.get("duration", 0)


def _pillow_source(media, name: str, path: str | None) -> _Source:
    """Animated WebP: FFmpeg's WebP decoder reads stills only."""
    try:
        image = Image.open(media)
    except (OSError, ValueError) as err:
        raise _unreadable(name, err) from None
    durations = [_frame_ms(frame) for frame in ImageSequence.Iterator(image)]
    mean_ms = sum(durations) / len(durations)
    fps = Fraction(1000 / mean_ms).limit_denominator(1001) if mean_ms > 0 else Fraction(24)

    def frames():
        start = 0.0
        for frame, ms in zip(ImageSequence.Iterator(image), durations):
            # The iterator moves one Image through the frames: read() runs before it moves on (see above).
            yield (lambda frame=frame: np.array(frame.convert("RGB"))), start
            start += ms / 1000

    return _Source(name, path, fps, image.width, image.height, len(durations), len(durations), frames(),
                   image.close, lambda start, end: None)


def _media_source(media, name: str, path: str | None) -> _Source:
    """A video file (a path) or a binary stream (e.g. the BytesIO behind ComfyUI's VideoFromFile), with PyAV."""
    _rewind(media)
    try:
        container = av.open(media)
    except av.FFmpegError as err:
        raise _unreadable(name, err) from None
    if container.format.name == "webp_pipe":
        container.close()
        _rewind(media)
        return _pillow_source(media, name, path)
    if not container.streams.video:
        container.close()
        raise ValueError(f"{name} has no video stream: choose a file with video in it.")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    fps = _pyav_rate(container, stream)
    estimate = stream.frames or (round(container.duration / av.time_base * fps) if container.duration else None)
    errors: list = []
    return _Source(name, path, fps, stream.width, stream.height, stream.frames or None, estimate,
                   _pyav_frames(container, stream, fps, name, errors), container.close,
                   lambda start, end: load_audio(media, start, end), _stream_end(container, stream), errors)


# ---- image folders -------------------------------------------------------------------------------------

def natural_key(name: str) -> tuple[list, str]:
    """Sort key putting numbers in number order: frame_2 before frame_10 (the name itself breaks ties)."""
    parts = _DIGITS.split(name.casefold())  # text, digits, text, ...: the same kinds line up when compared
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], name


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The frames of an image-sequence folder: its image files, in natural order.

    Hidden files are left out: macOS writes '._frame_0001.png' companions beside the real frames on shared drives.
    """
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if not e.name.startswith(".")
                 and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS and e.is_file()]
    return [Path(folder, n) for n in sorted(names, key=natural_key)]


def image_sequence(folder: str | os.PathLike) -> list[Path]:
    """``image_files``, or a ValueError saying the folder holds no images."""
    files = image_files(folder)
    if not files:
        raise ValueError(f"{folder} is a folder that holds no images ({_EXTENSION_LIST}): choose a folder of "
                         "frames (frame_0001.png, ...) or a video file.")
    return files


def is_image_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding at least one frame (stops at the first)."""
    if not os.path.isdir(path):
        return False
    with os.scandir(path) as entries:
        return any(not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS and e.is_file()
                   for e in entries)


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """Changes when a frame is added to, removed from, renamed in or rewritten in an image-sequence folder.

    Each file's size and modification time, not the folder's own: rewriting a file in place leaves the folder's
    modification time as it was.
    """
    digest = hashlib.sha1()
    for file in image_files(folder):
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{os.path.abspath(folder)}:{digest.hexdigest()}"


def _pixels(image: np.ndarray, file: Path) -> np.ndarray:
    """uint8 stays uint8 (4x smaller than float); 16-bit and float samples become float32 in 0..1."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535
    if image.dtype.kind == "f":
        # HDR values above 1 (EXR) are clipped: IMAGE is 0..1. NaN/inf, which renderers do write, count as 0/1.
        return np.clip(np.nan_to_num(image.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0, 1)
    raise ValueError(f"{file.name} has {image.dtype} samples: save it with 8- or 16-bit integer or float samples.")


def _read_exr(file: Path) -> np.ndarray:
    """EXR through PyAV. OpenCV reads EXR only when built with OpenEXR and OPENCV_IO_ENABLE_OPENEXR=1 is set before
    its first EXR read; the opencv-python(-headless) 5.0 wheels are built without it ('OpenEXR: NO' in
    cv2.getBuildInformation()), so no setting helps there. FFmpeg's own EXR decoder is in every PyAV wheel."""
    try:
        with av.open(str(file)) as container:
            frame = next(container.decode(video=0))
    except (av.FFmpegError, StopIteration, IndexError, ValueError) as err:
        fix = ("re-export it as a single-part scanline or tiled EXR, or as a 16-bit PNG or TIFF"
               if "exr" in av.codecs_available else
               "install a PyAV build whose FFmpeg has the EXR decoder (`pip install av`, the wheels have it)")
        raise ValueError(f"Cannot read {file.name} as an EXR image ({err}): {fix}.") from None
    if frame.format.name.startswith(_EXR_FLOAT_FORMATS):
        image = frame.to_ndarray()  # (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA, float32
    else:  # integer (UINT) channels
        image = frame.to_ndarray(format="rgb48le")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    return image[..., :3]


def read_image(file: str | os.PathLike) -> np.ndarray:
    """One image file as RGB (H, W, 3): uint8 for 8-bit files, float32 in 0..1 for 16-bit and float ones.

    Alpha is dropped, as Video Encode drops it: IMAGE has three channels.
    """
    file = Path(file)
    if file.suffix.lower() == ".exr":
        return _pixels(_read_exr(file), file)
    try:
        data = np.fromfile(file, np.uint8)  # decoded from memory: cv2.imread cannot open non-ASCII paths on Windows
    except OSError as err:
        raise ValueError(f"Cannot read {file.name} ({err.strerror}): check that the file is readable.") from None
    # ANYDEPTH keeps 16-bit and float samples; ANYCOLOR gives gray, or BGR without alpha.
    image = cv2.imdecode(data, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    if image is None:
        raise ValueError(f"Cannot read {file.name} as an image: it is damaged or not really "
                         f"{file.suffix.lower()[1:]}; re-export it or move it out of {file.parent.name}.")
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB)
    return _pixels(image, file)


def _folder_source(folder: Path, fps: float) -> _Source:
    """A folder of images, one per frame, in natural name order, at ``fps`` (images carry no rate)."""
    if not fps or fps <= 0:
        raise ValueError(f"fps must be > 0 for an image folder, got {fps}: give the sequence's frame rate (e.g. 24).")
    files = image_sequence(folder)
    first = read_image(files[0])  # gives the size; kept, so the first frame is not read twice
    height, width = first.shape[:2]
    rate = Fraction(fps).limit_denominator(1001)

    def read(i: int) -> np.ndarray:
        image = first if i == 0 else read_image(files[i])
        if image.shape[:2] != (height, width):
            h, w = image.shape[:2]
            raise ValueError(f"{files[i].name} is {w}x{h} but {files[0].name} is {width}x{height}: every image in "
                             f"{folder.name} must have the same size; resize it or move it out.")
        return image

    frames = ((partial(read, i), float(i / rate)) for i in range(len(files)))
    return _Source(folder.name, str(folder), rate, width, height, len(files), len(files), frames,
                   lambda: None, lambda start, end: None)


# ---- a clip in memory ----------------------------------------------------------------------------------

def _tensor_frame(images: torch.Tensor, i: int) -> np.ndarray:
    frame = images[i, ..., :3].detach().cpu()
    # Float frames stay float: a float IMAGE (e.g. a sampler's output) is not rounded to 8 bits on the way.
    return frame.numpy() if frame.dtype == torch.uint8 else frame.float().numpy()


def _audio_span(audio: dict | None, start: float, end: float) -> dict | None:
    """The AUDIO between ``start`` and ``end`` seconds, padded with silence where it is shorter (as load_audio)."""
    if audio is None:
        return None
    wave = audio["waveform"]
    wave = wave[0] if wave.ndim == 3 else wave  # ComfyUI AUDIO is (batch, channels, samples)
    rate = int(audio["sample_rate"])
    first, last = round(start * rate), round(end * rate)
    out = torch.zeros((wave.shape[0], max(0, last - first)), dtype=torch.float32)
    lo, hi = first, min(last, wave.shape[1])
    if hi > lo:
        out[:, :hi - lo] = wave[:, lo:hi].detach().float().cpu()
    return {"waveform": out.unsqueeze(0), "sample_rate": rate}


def _clip_source(clip: Clip) -> _Source:
    images = clip.images
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] < 3:
        raise ValueError(f"The clip's frames must be an IMAGE batch (F, H, W, 3) with F >= 1, "
                         f"got shape {tuple(images.shape)}.")
    rate = Fraction(clip.fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"The clip's frame rate must be > 0, got {clip.fps}.")
    count = images.shape[0]
    frames = ((partial(_tensor_frame, images, i), float(i / rate)) for i in range(count))
    return _Source("the clip", None, rate, images.shape[2], images.shape[1], count, count, frames,
                   lambda: None, lambda start, end: _audio_span(clip.audio, start, end))


def _open_source(source, fps: float) -> _Source:
    if isinstance(source, Clip):
        return _clip_source(source)
    if hasattr(source, "read"):  # a binary stream
        name = getattr(source, "name", None)
        return _media_source(source, os.path.basename(name) if isinstance(name, str) else "the video stream", None)
    path = Path(source)
    if path.is_dir():
        return _folder_source(path, fps)
    if not path.is_file():
        raise FileNotFoundError(f"Video file not found: {path}. Check the path or upload the file.")
    return _media_source(str(path), path.name, str(path))


def _estimated_total(source: _Source, skip_first: int, ratio: Fraction, every_nth: int, frame_cap: int) -> int:
    """Frames that will be kept, for progress; exact when the source frame count is known."""
    if source.estimated_count is None:
        return frame_cap
    return sum(1 for _ in select_frames(range(source.estimated_count), skip_first, ratio, every_nth, frame_cap))


# ---- audio ---------------------------------------------------------------------------------------------

def load_audio(media, start: float, end: float) -> dict | None:
    """The first audio stream between ``start`` and ``end`` seconds as ComfyUI AUDIO, or None if there is none.

    ``media`` is a path or a binary stream. Gaps (audio starting late or ending early) are filled with silence
    so the length matches the span.
    """
    _rewind(media)
    try:
        container = av.open(media if hasattr(media, "read") else str(media))
    except av.FFmpegError:
        return None  # e.g. animated WebP: no audio to read
    with container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate, channels = stream.rate, stream.channels
        first, last = round(start * rate), round(end * rate)
        out = np.zeros((channels, max(0, last - first)), np.float32)
        # Interleaved ("flt"), not planar: PyAV crashes converting planar 7.1 (8 planes) to an array.
        to_float = av.AudioResampler(format="flt", layout=stream.layout, rate=rate)
        cursor = None  # absolute sample index of the next decoded sample
        try:
            for frame in container.decode(stream):
                if cursor is None:
                    # Only the first timestamp places the audio; after it samples run on contiguously, because
                    # containers such as Matroska round timestamps to 1 ms (tens of samples).
                    cursor = round(frame.time * rate) if frame.time is not None else 0
                if cursor >= last:
                    break
                packed = [f.to_ndarray().reshape(-1, channels) for f in to_float.resample(frame)]
                chunk = np.concatenate(packed, axis=0).T if packed else np.zeros((channels, 0), np.float32)
                lo, hi = max(cursor, first), min(cursor + chunk.shape[1], last)
                if hi > lo:
                    out[:, lo - first:hi - first] = chunk[:, lo - cursor:hi - cursor]
                cursor += chunk.shape[1]
        except av.FFmpegError as err:
            # A truncated file ends mid-packet: keep the audio decoded so far (the frames are kept too).
            name = getattr(media, "name", None) if hasattr(media, "read") else media
            name = os.path.basename(name) if isinstance(name, (str, os.PathLike)) else "the video stream"
            log.warning("Load Video: the audio of %s breaks off after %.2f s (%s): the rest of the clip is silent; "
                        "re-export or re-copy the file.", name, (cursor or 0) / rate, err)
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
        self.items, self.count, self.exhausted, self.last = items, 0, False, None

    def __iter__(self):
        return self

    def __next__(self) -> T:
        try:
            item = next(self.items)
        except StopIteration:
            self.exhausted = True
            raise
        self.count += 1
        self.last = item
        return item


def _to_image(kept: list[np.ndarray]) -> torch.Tensor:
    """uint8 or float 0..1 frames -> IMAGE float32 (F, H, W, 3), freeing each frame once copied."""
    frames = torch.empty((len(kept), *kept[0].shape), dtype=torch.float32)
    for i in range(len(kept)):
        pixels = torch.from_numpy(kept[i])
        if pixels.dtype == torch.uint8:
            frames[i] = pixels.float().div_(255)
        else:
            frames[i].copy_(pixels).clamp_(0, 1)  # bicubic resizing of float frames can overshoot 0..1
        kept[i] = None
    return frames


def ffmpeg_reads(path: str | os.PathLike) -> bool:
    """Whether FFmpeg alone decodes this file's video: False for animated WebP, which only Pillow reads here.

    Readers that only have FFmpeg (ComfyUI's VideoFromFile) need such a file handed over as its frames instead.
    """
    try:
        with av.open(str(path)) as container:
            return container.format.name != "webp_pipe" and bool(container.streams.video)
    except av.FFmpegError:
        return False


class VideoStream:
    """A clip being decoded: its selected frames one at a time (``frames``) or as IMAGE batches (``batches``).

    Both load_video (which collects the stream) and the streaming loaders read this one generator, so the two
    cannot drift. ``width``/``height`` (the output size) and ``estimated_count`` are known up front; ``info``
    and ``audio`` only once the frames have run out, because the kept count, the rate fitted to the clip's end
    and a truncated file's real length are facts of the decode itself. Iterate it once.
    """

    def __init__(self, source: _Source, frame_cap: int, skip_first: int, every_nth: int, target_fps: float,
                 width: int, height: int, multiple_of: int, fit: str,
                 progress: Callable[[int, int], None] | None):
        self._source, self._progress = source, progress
        self._selection = (skip_first, every_nth, frame_cap)
        self._fit = fit
        self._keep_scale = width <= 0 and height <= 0
        self._ratio = _rate_ratio(target_fps, source.fps)
        self.width, self.height = output_size(source.width, source.height, width, height, multiple_of)
        self.estimated_count = _estimated_total(source, skip_first, self._ratio, every_nth, frame_cap)
        self.info: dict | None = None
        self.audio: dict | None = None
        self._started = False

    def frames(self) -> Iterator[np.ndarray]:
        """The selected frames, resized: (H, W, 3) uint8, or float32 in 0..1 for 16-bit and float sources.

        A frame repeated by fps upsampling is the same array each time. When the frames run out, ``info`` and
        ``audio`` are set (or the "no frames selected" error is raised); the source is closed however it ends.
        """
        if self._started:
            raise RuntimeError("a VideoStream is read once: open the video again to read it again")
        self._started = True
        source, progress = self._source, self._progress
        skip_first, every_nth, frame_cap = self._selection
        out = (self.width, self.height)
        decoded = _Counting(source.frames)
        total, count = self.estimated_count, 0
        start_time = 0.0
        first_index = 0  # source index of the first kept frame
        try:
            scaled = _scaled_size(source.width, source.height, *out, self._fit, keep_scale=self._keep_scale)
            last_read = fitted = None
            for read, time in select_frames(decoded, skip_first, self._ratio, every_nth, frame_cap):
                if not count:
                    # select_frames yields each item before pulling the next, so the count locates this frame.
                    start_time, first_index = time, decoded.count - 1
                if read is not last_read:  # a frame repeated by fps upsampling is read and resized once
                    fitted, last_read = fit_frame(read(), scaled, out, self._fit), read
                count += 1
                yield fitted
                if progress is not None:
                    progress(count, max(total, count))
        finally:
            source.close()
        if progress is not None and count and count < total:
            progress(count, count)  # the clip ended before the estimate: the bar ends here, not at 82 %
        _warn_if_cut_short(source, decoded)
        # What the source really holds once decoded to its end (a truncated file holds less than its header says).
        source_count = decoded.count if decoded.exhausted else source.frame_count
        if not count:
            raise ValueError(f"No frames selected from {source.name} ({decoded.count} frames, "
                             f"skip_first={skip_first}): lower skip_first or frame selection settings.")
        out_fps = _output_fps(source.fps * self._ratio / every_nth, count, source_count, first_index, source.fps)
        duration = float(count / out_fps)
        self.info = {
            "fps": float(out_fps), "source_fps": float(source.fps),
            "source_width": source.width, "source_height": source.height, "source_frame_count": source_count,
            "frame_count": count, "width": out[0], "height": out[1], "duration": duration, "path": source.path,
        }
        self.audio = source.audio(start_time, start_time + duration)

    def batches(self, size: int = 8) -> Iterator[torch.Tensor]:
        """The selected frames as IMAGE batches (n <= ``size``, H, W, 3) float32 in 0..1: only one batch of pixels
        exists at a time (plus the decoder's current frame)."""
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}.")
        pending: list[np.ndarray] = []
        for frame in self.frames():
            pending.append(frame)
            if len(pending) == size:
                yield _to_image(pending)
                pending = []
        if pending:
            yield _to_image(pending)


def open_video(source, frame_cap: int = 0, skip_first: int = 0, every_nth: int = 1,
               target_fps: float = 0.0, width: int = 0, height: int = 0, multiple_of: int = 8,
               fit: str = "crop", progress: Callable[[int, int], None] | None = None, fps: float = 24.0,
               ) -> VideoStream:
    """Open a video for reading frame by frame; the arguments are load_video's (see there).

    The arguments are checked and the source opened (so a missing or unreadable file fails here, before any
    frame); the frames are decoded only as the stream is read.
    """
    _check_args(frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit)
    opened = _open_source(source, fps)
    try:
        return VideoStream(opened, frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit,
                           progress)
    except BaseException:
        opened.close()
        raise


def load_video(source, frame_cap: int = 0, skip_first: int = 0, every_nth: int = 1,
               target_fps: float = 0.0, width: int = 0, height: int = 0, multiple_of: int = 8,
               fit: str = "crop", progress: Callable[[int, int], None] | None = None, fps: float = 24.0,
               ) -> tuple[torch.Tensor, dict, dict | None]:
    """Decode the selected frames of a video -> (IMAGE (F, H, W, 3) float 0..1, info dict, AUDIO or None).

    ``source``: a video file's path; a folder of images (png, jpg/jpeg, webp, bmp, tif/tiff, exr; one per frame,
    in natural name order, all the same size; 16-bit and float images keep their precision, float values are
    clipped to 0..1; no audio) played at ``fps``, which is ignored for every other source (they carry their own
    rate); a binary stream holding a video file (e.g. a BytesIO); or a ``Clip`` in memory.

    Selection: skip ``skip_first`` frames, resample to ``target_fps`` (nearest source frame in time; 0 = off),
    keep every ``every_nth``, stop after ``frame_cap`` (0 = all). Only selected frames are read, so a damaged or
    odd-sized image that the selection skips is not reported. Size: see ``output_size``; ``fit`` "crop" covers
    the target and centre-crops, "pad" fits inside and pads with black.

    This is ``open_video`` collected whole; read ``open_video(...).batches()`` to hold a few frames at a time.
    """
    return collect(open_video(source, frame_cap, skip_first, every_nth, target_fps, width, height, multiple_of, fit,
                              progress, fps))


def collect(stream: VideoStream) -> tuple[torch.Tensor, dict, dict | None]:
    """A whole stream as (IMAGE, info, AUDIO): what load_video returns."""
    # Collected as the decoder's uint8 frames, converted to float once at the end: 1.25x the IMAGE at peak,
    # where collecting float batches and concatenating them would need 2x.
    kept = list(stream.frames())
    return _to_image(kept), stream.info, stream.audio


def _output_fps(nominal: Fraction, kept: int, source_count: int | None, first_index: int,
                source_fps: Fraction) -> Fraction:
    """The kept frames' rate: ``nominal`` (source fps x resampling / every_nth), unless the last kept frame's
    interval would run past the end of the source.

    Every kept frame stands for ``every_nth`` resampled frames, so the output plays in real time at ``nominal``;
    but the last one may stand for fewer, because the clip ends first. Left alone, ``every_nth`` 1000 on a 24-frame
    clip gave one frame lasting 83 s (and 83 s of audio, mostly silence). So the kept frames are fitted to the
    span they come from, from the first kept frame to the end of the source: the rate rises just enough (2.4 ->
    2.5 fps for every 5th of 24 frames at 12 fps), and frames / fps stays the duration the audio is cut to.
    """
    if source_count is None:  # end unknown (stopped early on a file that does not say its length)
        return nominal
    span = Fraction(source_count - first_index) / source_fps
    if span <= 0 or kept / nominal <= span:
        return nominal
    return kept / span


def _warn_if_cut_short(source: _Source, decoded: _Counting) -> None:
    """A decode that ends before the container says the video does is a truncated or damaged file: say so, with
    how many frames were there (they are still used).

    A frame count alone is not proof: FFmpeg counts frames that an edit list then drops (clips trimmed without
    re-encoding), so when the header also gives the stream's end time, the last frame must fall short of it too.
    """
    if not decoded.exhausted or decoded.count == 0:
        return
    step = 1 / float(source.fps)
    last_time = decoded.last[1]
    short_in_time = source.end_time is None or last_time + 2 * step < source.end_time  # over one frame missing
    announced = source.frame_count
    error = f": decoding failed ({source.decode_errors[0]})" if source.decode_errors else ""
    if announced and decoded.count < announced and short_in_time:
        got = f"after {decoded.count} of the {announced} frames its container announces"
    elif announced is None and source.end_time is not None and short_in_time:
        got = (f"after {decoded.count} frames, at {last_time + step:.2f} s of the {source.end_time:.2f} s its "
               "container announces")
    elif error:
        got = f"after {decoded.count} frames"
    else:
        return
    log.warning("Load Video: %s ended %s (the file is truncated or damaged%s): the clip is shorter than expected; "
                "re-export or re-copy the file.", source.name, got, error)
