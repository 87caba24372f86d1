"""Encode IMAGE frames (+ optional AUDIO) to a file, with PyAV.

Output formats are data: one JSON file per format in ``video_formats/``. Keys:
``extension``, ``container`` (FFmpeg muxer name, null for image sequences), ``container_options``,
``codec`` (PyAV encoder name), ``pix_fmt``, optional ``codec_tag`` and ``colorspace`` ("bt709"),
``codec_options``, ``quality`` (null, or ``{"option", "default", "min", "max", "better"}``: the
number is passed as that codec option), ``audio_codec`` (null = no audio), optional
``audio_bitrate`` (for stereo; scaled by channels / 2 for surround), and ``image_sequence``
(true = a folder of one file per frame). Adding a format is adding a file.

Nothing is ever half-written under an output's name: the numbered name is reserved first (an empty file or
folder, created exclusively), the output is written beside it as ``.<name>.part`` and renamed onto the
reserved name only when complete; on an error or an interrupt both are removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Iterable, Iterator

import av
import numpy as np
import torch
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

log = logging.getLogger(__name__)

FORMATS_DIR = Path(__file__).with_name("formats")
_REQUIRED_KEYS = ("extension", "codec", "pix_fmt", "quality", "audio_codec", "image_sequence")
# Channel count -> FFmpeg layout name for the AUDIO waveform (and for the encoder, when its codec takes it).
_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}


def list_formats() -> list[str]:
    """Names of the output formats, read from the ``video_formats`` folder."""
    return sorted(p.stem for p in FORMATS_DIR.glob("*.json"))


def _read_spec(name: str) -> dict:
    path = FORMATS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"Unknown video format {name!r}: choose one of {', '.join(list_formats())}.")
    spec = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in _REQUIRED_KEYS if k not in spec]
    if missing:
        raise ValueError(f"Video format file {path.name} lacks {', '.join(missing)}: add them.")
    return spec


def format_spec(name: str) -> dict:
    """The parsed JSON of one format."""
    return _read_spec(name)


def _codec_options(spec: dict, quality: float | None) -> dict[str, str]:
    """Codec options of the format, with ``quality`` mapped onto its codec option."""
    options = {k: str(v) for k, v in spec.get("codec_options", {}).items()}
    q = spec["quality"]
    if q is None:
        return options
    value = q["default"] if quality is None else quality
    if not q["min"] <= value <= q["max"]:
        raise ValueError(f"quality {value} is out of range for {spec['codec']}: use {q['min']}..{q['max']}.")
    options[q["option"]] = str(int(value) if float(value).is_integer() else value)
    return options


def output_folder(directory: str | os.PathLike, filename_prefix: str) -> Path:
    """The folder ``filename_prefix`` writes into under ``directory`` (raises ValueError for a bad prefix)."""
    sub, _ = _split_prefix(filename_prefix)
    return Path(directory) / sub


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and write (then remove) a probe file in it; raise OSError if that fails.

    Asking the file system is the only reliable test: permission bits say nothing for root, a read-only mount or
    a full disk, and os.access is wrong on network shares.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write_probe_{os.getpid()}_{id(folder):x}"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    probe.unlink()


def _split_prefix(filename_prefix: str) -> tuple[Path, str]:
    """('edits/clip') -> (Path('edits'), 'clip'); refuses absolute paths and '..'."""
    text = filename_prefix.replace("\\", "/").strip()
    pure = PurePosixPath(text)
    if not text or pure.is_absolute() or PureWindowsPath(filename_prefix).is_absolute() or ":" in text:
        raise ValueError(f"filename_prefix {filename_prefix!r} must be a relative name like 'clip' or 'edits/clip'.")
    if ".." in pure.parts:
        raise ValueError(f"filename_prefix {filename_prefix!r} may not contain '..': use a name inside the output folder.")
    if text.endswith("/"):
        raise ValueError(f"filename_prefix {filename_prefix!r} ends with '/': add a file name after the folder.")
    return Path(*pure.parts[:-1]), pure.parts[-1]


def reserve_output_path(directory: str | os.PathLike, filename_prefix: str, extension: str,
                        folder: bool = False) -> Path:
    """Create and return ``<dir>/<sub>/<name>_NNNNN.<ext>`` (or a folder) with the next free number.

    The number follows the highest one already used by this prefix, so nothing is overwritten and
    outputs sort in the order they were made. Creation is exclusive, so two writers never share a path.
    What is created is empty: a placeholder that holds the name until the finished output replaces it.
    """
    sub, name = _split_prefix(filename_prefix)
    parent = Path(directory) / sub
    parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(name) + r"_(\d{5,})(\..*)?")
    used = [int(m.group(1)) for p in parent.iterdir() if (m := pattern.fullmatch(p.name))]
    number = max(used, default=0) + 1
    while True:
        path = parent / (f"{name}_{number:05d}" if folder else f"{name}_{number:05d}.{extension}")
        try:
            if folder:
                path.mkdir()
            else:
                # 0o666 like open(): the user's umask decides (os.open's default 0o777 made files executable)
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            number += 1


def _uint8_frames(frames: torch.Tensor | np.ndarray) -> Iterator[np.ndarray]:
    """(F, H, W, 3) float 0..1 (or uint8) -> one contiguous uint8 RGB frame at a time."""
    for frame in frames:
        frame = frame[..., :3]  # alpha, if any, is dropped: none of the video codecs here keeps it
        if isinstance(frame, torch.Tensor):
            frame = (frame.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        elif frame.dtype != np.uint8:
            frame = (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)
        yield np.ascontiguousarray(frame)


def _pad_for_chroma(rgb: np.ndarray, pix_fmt: str) -> np.ndarray:
    """Pad right/bottom by repeating the edge so chroma-subsampled formats (yuv420p) get even sizes."""
    fmt = av.VideoFormat(pix_fmt)
    step_w, step_h = 16 // fmt.chroma_width(16), 16 // fmt.chroma_height(16)
    h, w = rgb.shape[:2]
    pad_h, pad_w = -h % step_h, -w % step_w
    if pad_h == 0 and pad_w == 0:
        return rgb
    return np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _to_video_frame(rgb: np.ndarray, spec: dict) -> av.VideoFrame:
    """RGB uint8 -> a frame in the codec's pixel format (palette per frame for GIF)."""
    if spec["pix_fmt"] == "pal8":
        # Pillow picks an adaptive 256-colour palette; FFmpeg's own rgb->pal8 uses a fixed 3-3-2 one.
        indexed = Image.fromarray(rgb).quantize(256)
        palette = np.zeros((256, 4), np.uint8)
        colours = np.array(indexed.getpalette(), np.uint8).reshape(-1, 3)[:256]
        palette[: len(colours), 1:] = colours
        palette[:, 0] = 255  # ARGB, opaque
        return av.VideoFrame.from_ndarray((np.array(indexed), palette), format="pal8")
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    if spec.get("colorspace") == "bt709":
        # Convert with the same matrix the stream is tagged with, so players show the true colours.
        frame = frame.reformat(format=spec["pix_fmt"], dst_colorspace=Colorspace.ITU709,
                               dst_color_range=ColorRange.MPEG)
    return frame


def _tag_bt709(stream: av.video.stream.VideoStream) -> None:
    cc = stream.codec_context
    cc.colorspace, cc.color_range = Colorspace.ITU709, ColorRange.MPEG
    cc.color_primaries = cc.color_trc = 1  # 1 = BT.709 in FFmpeg's primaries and transfer enums


def _output_rate(codec: str, sample_rate: int) -> int:
    """Keep the input rate when the encoder accepts it, else the nearest higher one it has."""
    rates = av.Codec(codec, "w").audio_rates
    if not rates or sample_rate in rates:
        return sample_rate
    higher = [r for r in rates if r >= sample_rate]
    return min(higher) if higher else max(rates)


def _check_waveform(audio: dict) -> tuple[np.ndarray, int]:
    """AUDIO dict -> ((channels, samples) float32, sample rate), refusing channel counts no layout names."""
    wave = audio["waveform"]
    wave = wave[0] if wave.ndim == 3 else wave  # ComfyUI AUDIO is (batch, channels, samples)
    wave = wave.detach().float().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave, np.float32)
    if wave.shape[0] not in _LAYOUTS:
        raise ValueError(f"audio has {wave.shape[0]} channels: give mono, stereo, 5.1 or 7.1 audio.")
    return np.ascontiguousarray(wave, np.float32), int(audio["sample_rate"])


def encoder_layout(codec: str, channels: int, rate: int, sample_fmt: str) -> str:
    """The waveform's own layout when ``codec`` encodes it, else stereo (mono stays mono), with a warning.

    Asked of the encoder itself (opened once, alone): AAC, Opus and FLAC take 5.1 and 7.1; MP2 and MP3 stop
    at stereo.
    """
    wanted = _LAYOUTS[channels]
    if channels <= 2:
        return wanted
    probe = av.CodecContext.create(codec, "w")
    probe.rate, probe.layout, probe.format = rate, wanted, sample_fmt
    try:
        probe.open()
    except (av.FFmpegError, ValueError) as err:
        log.warning("Video Encode: the %s audio encoder cannot write %d channels (%s) (%s): the audio is downmixed "
                    "to stereo; pick a format whose audio codec keeps them.",
                    codec, channels, wanted, err)
        return "stereo"
    return wanted


class _AudioTrack:
    """Feeds a waveform to the format's audio encoder in pieces, so audio and video packets interleave."""

    def __init__(self, container, codec: str, bit_rate: int | None, wave: np.ndarray, rate_in: int):
        self.container, self.wave, self.rate_in, self.sent = container, wave, rate_in, 0
        self.layout_in = _LAYOUTS[wave.shape[0]]
        rate = _output_rate(codec, rate_in)
        sample_fmt = av.Codec(codec, "w").audio_formats[0].name
        layout = encoder_layout(codec, wave.shape[0], rate, sample_fmt)
        self.stream = container.add_stream(codec, rate=rate)
        self.stream.layout = layout
        if bit_rate:
            # A format's bitrate is for stereo: surround gets as much per channel pair.
            self.stream.bit_rate = int(bit_rate) * max(2, av.AudioLayout(layout).nb_channels) // 2
        self.resampler = av.AudioResampler(format=sample_fmt, layout=layout, rate=rate)

    def _encode(self, frame: av.AudioFrame | None) -> None:
        for out in self.resampler.resample(frame):
            self.container.mux(self.stream.encode(out))

    def feed_until(self, seconds: float) -> None:
        """Send the audio up to ``seconds``: the waveform's samples, then silence where it is shorter than the video.

        Past the waveform's end comes silence made here, not a padded copy made up front: a streamed video's
        length is known only once its last frame is written (``finish``), and the audio stops at exactly that.
        """
        end = round(seconds * self.rate_in)
        if end > self.sent:
            piece = self.wave[:, self.sent:end]
            if piece.shape[1] < end - self.sent:
                piece = np.pad(piece, ((0, 0), (0, end - self.sent - piece.shape[1])))
            # Interleaved ("flt"), not planar: PyAV's planar from_ndarray fails for 8 channels (7.1).
            packed = np.ascontiguousarray(piece.T).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(packed, format="flt", layout=self.layout_in)
            frame.sample_rate, frame.pts, frame.time_base = self.rate_in, self.sent, Fraction(1, self.rate_in)
            self._encode(frame)
            self.sent = end

    def finish(self, seconds: float) -> None:
        """The audio up to the video's length ``seconds`` (a longer waveform is cut there), then flush."""
        self.feed_until(seconds)
        self._encode(None)  # flush the resampler, then the encoder
        self.container.mux(self.stream.encode(None))


def _frame_batches(frames) -> Iterator[torch.Tensor | np.ndarray]:
    """The IMAGE batches of ``frames``: one tensor (F, H, W, 3|4), or an iterable of such batches (a stream,
    e.g. latents decoded a few frames at a time), each checked as it arrives."""
    if isinstance(frames, (torch.Tensor, np.ndarray)):
        if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] not in (3, 4):
            raise ValueError(f"frames must be an IMAGE batch (F, H, W, 3) with F >= 1, got shape "
                             f"{tuple(frames.shape)}.")
        yield frames
        return
    size = None
    for batch in frames:
        if batch.ndim != 4 or batch.shape[-1] not in (3, 4):
            raise ValueError(f"frames must be IMAGE batches (F, H, W, 3), got a batch of shape {tuple(batch.shape)}.")
        if size is None:
            size = tuple(batch.shape[1:3])
        elif tuple(batch.shape[1:3]) != size:
            raise ValueError(f"frame batches changed size from {size[1]}x{size[0]} to {batch.shape[2]}x"
                             f"{batch.shape[1]}: every frame of a video must have the same size.")
        yield batch


def _stream_frames(frames, counter: list) -> Iterator[np.ndarray]:
    """uint8 RGB frames of ``frames`` (see _frame_batches), counting them in ``counter[0]``."""
    for batch in _frame_batches(frames):
        for rgb in _uint8_frames(batch):
            counter[0] += 1
            yield rgb
    if counter[0] == 0:
        raise ValueError("frames must be an IMAGE batch (F, H, W, 3) with F >= 1, got a stream of no frames.")


def _write_container(path: Path, spec: dict, frames, fps: Fraction, options: dict, audio: dict | None,
                     total: int | None, progress: Callable[[int, int], None] | None = None) -> None:
    with av.open(str(path), "w", format=spec["container"], options=spec.get("container_options", {})) as container:
        stream = container.add_stream(spec["codec"], rate=fps, options=options)
        stream.pix_fmt = spec["pix_fmt"]
        if spec.get("codec_tag"):
            stream.codec_tag = spec["codec_tag"]
        if spec.get("colorspace") == "bt709":
            _tag_bt709(stream)
        track = None
        if audio is not None and spec["audio_codec"]:
            wave, rate_in = _check_waveform(audio)
            track = _AudioTrack(container, spec["audio_codec"], spec.get("audio_bitrate"), wave, rate_in)
        count = [0]
        for i, rgb in enumerate(_stream_frames(frames, count)):
            rgb = _pad_for_chroma(rgb, spec["pix_fmt"])
            if i == 0:
                stream.height, stream.width = rgb.shape[:2]
            frame = _to_video_frame(rgb, spec)
            frame.pts = i  # time base is 1/fps, so pts counts frames
            container.mux(stream.encode(frame))
            if track:
                track.feed_until(float((i + 1) / fps))
            if progress is not None:
                # may raise (ComfyUI's Cancel): the caller removes the partial file
                progress(i + 1, max(total or 0, i + 1))
        container.mux(stream.encode(None))
        if track:
            track.finish(float(count[0] / fps))  # trimmed, or padded with silence, to the video's length


def _write_image_sequence(folder: Path, spec: dict, frames, options: dict, total: int | None,
                          progress: Callable[[int, int], None] | None = None) -> None:
    """One still image per frame, each encoded by the format's codec: frame_00000.<ext>, ..."""
    for i, rgb in enumerate(_stream_frames(frames, [0])):
        cc = av.CodecContext.create(spec["codec"], "w")
        cc.height, cc.width = rgb.shape[:2]
        cc.pix_fmt, cc.time_base = spec["pix_fmt"], Fraction(1, 1)
        cc.options = options
        packets = cc.encode(_to_video_frame(rgb, spec)) + cc.encode(None)
        (folder / f"frame_{i:05d}.{spec['extension']}").write_bytes(b"".join(bytes(p) for p in packets))
        if progress is not None:
            progress(i + 1, max(total or 0, i + 1))


def encode_video(frames: torch.Tensor | Iterable[torch.Tensor], directory: str | os.PathLike, filename_prefix: str,
                 fps: float, format: str = "h264-mp4", quality: float | None = None, audio: dict | None = None,
                 progress: Callable[[int, int], None] | None = None, frame_count: int | None = None) -> str:
    """Write IMAGE frames (F, H, W, 3 in 0..1) as ``<directory>/<prefix>_NNNNN.<ext>``; return the path.

    ``frames`` may also be an iterable of IMAGE batches (e.g. ``models.decode_latent_stream``), written as they
    come, so the clip never needs to be in memory as pixels; ``frame_count``, if known, is only the progress
    total. A stream that raises part way leaves nothing behind, as a Cancel does.

    ``fps`` may be fractional (29.97 is written as 2997/100). ``audio`` is a ComfyUI AUDIO dict; it is
    trimmed or padded to the video's length and dropped for formats without audio. ``progress(done, total)``
    is called after each frame; if it raises (a Cancel), nothing is left behind. The file appears under its
    final name only once complete (see the module docstring).
    """
    spec = _read_spec(format)
    if not fps or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}: pass the source fps (e.g. 24).")
    rate = Fraction(fps).limit_denominator(1001)
    options = _codec_options(spec, quality)
    if isinstance(frames, (torch.Tensor, np.ndarray)):
        next(_frame_batches(frames))  # a bad tensor is refused before a name is reserved
        frame_count = frames.shape[0]
    folder = spec["image_sequence"]
    path = reserve_output_path(directory, filename_prefix, spec["extension"], folder=folder)
    # Same folder, so the final rename never crosses file systems (it stays one atomic step); hidden, so the
    # numbering above never reads it as an output.
    part = path.with_name(f".{path.name}.part")
    try:
        _remove(part)  # a leftover of a killed run under our (reserved, hence unique) number
        if folder:
            part.mkdir()
            _write_image_sequence(part, spec, frames, options, frame_count, progress)
        else:
            _write_container(part, spec, frames, rate, options, audio, frame_count, progress)
        _commit(part, path, folder)
    except BaseException:  # also KeyboardInterrupt and ComfyUI's Cancel: no half-written output, name freed
        for leftover in (part, path):
            try:
                _remove(leftover)
            except OSError as err:  # cleanup must not hide the original error; say what is left
                log.warning("Video Encode: could not remove %s (%s): delete it by hand.", leftover, err)
        raise
    return str(path)


def _commit(part: Path, path: Path, folder: bool) -> None:
    """Move the finished output onto its reserved (empty) name."""
    if folder and os.name == "nt":
        # Windows cannot rename a folder onto an existing one: free the reserved name, then take it. If another
        # writer takes it in between, rename raises FileExistsError rather than mixing outputs.
        path.rmdir()
        os.rename(part, path)
    else:
        os.replace(part, path)  # atomic; POSIX rename replaces the empty placeholder file or folder


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
