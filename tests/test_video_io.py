"""Video load/encode: round trips, frame selection, sizing, audio, file naming, errors, the sample clip."""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_video_edit.pipelines_core.video import encode as video_encode
from comfyui_video_edit.pipelines_core.video.decode import load_video, output_size, select_frames
from comfyui_video_edit.pipelines_core.video.encode import encode_video, format_spec, list_formats

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STEP = 10  # index colour: frame i has red = STEP * i


def index_clip(n: int, h: int = 48, w: int = 64) -> torch.Tensor:
    """Flat frames whose colour says their index: red = STEP*i, green = 255 - STEP*i, blue = 128."""
    red = torch.arange(n, dtype=torch.float32) * STEP / 255
    clip = torch.empty(n, h, w, 3)
    clip[..., 0] = red.view(n, 1, 1)
    clip[..., 1] = 1 - red.view(n, 1, 1)
    clip[..., 2] = 128 / 255
    return clip


def indices_of(frames: torch.Tensor) -> list[int]:
    """Read back the index colour of each decoded frame (centre pixel, robust to codec noise)."""
    red = frames[:, frames.shape[1] // 2, frames.shape[2] // 2, 0] * 255
    return [round(float(r) / STEP) for r in red]


def tone(seconds: float, rate: int = 44100, hz: float = 440.0, channels: int = 1) -> dict:
    t = torch.arange(round(seconds * rate)) / rate
    wave = 0.3 * torch.sin(2 * math.pi * hz * t)
    return {"waveform": wave.repeat(channels, 1).unsqueeze(0), "sample_rate": rate}


def dominant_hz(audio: dict) -> float:
    wave = audio["waveform"][0, 0].numpy()
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.argmax(spectrum) * audio["sample_rate"] / len(wave))


@pytest.fixture(scope="module")
def lossless24(tmp_path_factory) -> str:
    """24 index-coloured frames at 24 fps, lossless, shared by the selection tests."""
    return encode_video(index_clip(24), tmp_path_factory.mktemp("clip"), "idx", 24, format="ffv1-mkv")


# ---- formats -----------------------------------------------------------------------------------------

def test_formats_are_data_files_with_available_encoders():
    names = list_formats()
    for needed in ("h264-mp4", "h265-mp4", "webm", "gif", "webp", "png-sequence", "ffv1-mkv"):
        assert needed in names
    assert names == sorted(names)
    for name in names:
        spec = format_spec(name)
        assert spec["codec"] in av.codecs_available, name
        assert spec["audio_codec"] is None or spec["audio_codec"] in av.codecs_available, name
        if spec["quality"]:
            assert spec["quality"]["min"] <= spec["quality"]["default"] <= spec["quality"]["max"]


def test_adding_a_format_file_needs_no_code(tmp_path, monkeypatch):
    formats = tmp_path / "formats"
    shutil.copytree(video_encode.FORMATS_DIR, formats)
    spec = format_spec("h264-mp4") | {"container": "matroska", "extension": "mkv", "container_options": {}}
    (formats / "h264-mkv.json").write_text(json.dumps(spec))
    monkeypatch.setattr(video_encode, "FORMATS_DIR", formats)
    assert "h264-mkv" in list_formats()
    path = encode_video(index_clip(4), tmp_path, "x", 12, format="h264-mkv")
    assert path.endswith(".mkv") and load_video(path)[1]["frame_count"] == 4


# ---- round trips -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["h264-mp4", "h265-mp4", "webm", "gif", "webp", "ffv1-mkv"])
def test_round_trip_keeps_count_size_fps_and_order(tmp_path, fmt):
    clip = index_clip(12)
    path = encode_video(clip, tmp_path, "rt", 12, format=fmt)
    assert Path(path).suffix == "." + format_spec(fmt)["extension"]
    frames, info, audio = load_video(path)
    assert frames.shape == (12, 48, 64, 3) and frames.dtype == torch.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert info["fps"] == pytest.approx(12, rel=0.01)
    assert indices_of(frames) == list(range(12))
    assert audio is None


@pytest.mark.parametrize("fmt", ["ffv1-mkv", "png-sequence"])
def test_lossless_formats_are_pixel_exact(tmp_path, fmt):
    noise = torch.randint(0, 256, (5, 30, 42, 3), generator=torch.Generator().manual_seed(0)).float() / 255
    path = Path(encode_video(noise, tmp_path, "exact", 10, format=fmt))
    if fmt == "png-sequence":
        files = sorted(path.iterdir())
        assert path.is_dir() and [f.name for f in files] == [f"frame_{i:05d}.png" for i in range(5)]
        decoded = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).float() / 255
    else:
        decoded = load_video(path, multiple_of=2)[0]
    assert torch.equal((decoded * 255).round(), (noise * 255).round())


def test_odd_size_is_padded_to_even_for_yuv420(tmp_path):
    clip = index_clip(3, h=47, w=63)
    frames, _, _ = load_video(encode_video(clip, tmp_path, "odd", 12), multiple_of=1)
    assert frames.shape[1:3] == (48, 64)
    # the added row/column repeats the edge, so the content is unchanged
    assert (frames[:, -1] - frames[:, -2]).abs().max() < 0.03


def test_fractional_fps_is_kept_as_a_rational(tmp_path):
    path = encode_video(index_clip(6), tmp_path, "ntsc", 29.97)
    with av.open(path) as container:
        assert container.streams.video[0].average_rate == Fraction(2997, 100)
    assert load_video(path)[1]["fps"] == pytest.approx(29.97)


# ---- audio -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["h264-mp4", "webm", "ffv1-mkv"])
def test_audio_is_muxed_and_trimmed_to_the_video(tmp_path, fmt):
    path = encode_video(index_clip(12), tmp_path, "a", 12, format=fmt, audio=tone(3.0, channels=2))
    _, info, audio = load_video(path)
    assert audio is not None and audio["waveform"].dtype == torch.float32
    assert audio["waveform"].shape[:2] == (1, 2)
    assert audio["waveform"].shape[2] / audio["sample_rate"] == pytest.approx(info["duration"], abs=0.01)
    assert abs(dominant_hz(audio) - 440) < 5


def test_short_audio_is_padded_with_silence(tmp_path):
    path = encode_video(index_clip(12), tmp_path, "a", 12, audio=tone(0.5))
    with av.open(path) as container:
        stream = container.streams.audio[0]
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(stream)], axis=1)[0]
        rate = stream.rate
    assert len(decoded) / rate == pytest.approx(1.0, abs=0.05)
    assert np.abs(decoded[: int(0.4 * rate)]).max() > 0.2  # the tone
    assert np.abs(decoded[int(0.6 * rate): int(0.95 * rate)]).max() < 0.01  # the padding


def test_formats_without_audio_drop_it(tmp_path):
    path = encode_video(index_clip(4), tmp_path, "g", 12, format="gif", audio=tone(1.0))
    with av.open(path) as container:
        assert not container.streams.audio


def test_loaded_audio_covers_only_the_selected_span(lossless24, tmp_path):
    # put a known tone on the lossless clip: 24 frames at 24 fps = 1 s
    frames = load_video(lossless24, multiple_of=1)[0]
    path = encode_video(frames, tmp_path, "span", 24, format="ffv1-mkv", audio=tone(1.0))
    _, info, audio = load_video(path, skip_first=6, frame_cap=6, multiple_of=1)
    assert info["duration"] == pytest.approx(0.25)
    assert audio["waveform"].shape[2] == round(0.25 * audio["sample_rate"])
    # the kept audio starts 6/24 s in: compare with the tone at that phase
    t = (torch.arange(audio["waveform"].shape[2]) + 0.25 * 44100) / 44100
    expected = 0.3 * torch.sin(2 * math.pi * 440 * t)
    assert torch.allclose(audio["waveform"][0, 0], expected, atol=2e-3)


# ---- file naming -------------------------------------------------------------------------------------

def test_second_encode_never_overwrites_the_first(tmp_path):
    first = Path(encode_video(index_clip(3), tmp_path, "edits/clip", 12))
    before = first.read_bytes()
    second = Path(encode_video(index_clip(5), tmp_path, "edits/clip", 12))
    assert first.name == "clip_00001.mp4" and second.name == "clip_00002.mp4"
    assert first.parent == second.parent == tmp_path / "edits"
    assert first.read_bytes() == before
    folder = Path(encode_video(index_clip(2), tmp_path, "edits/clip", 12, format="png-sequence"))
    assert folder.name == "clip_00003" and folder.is_dir()


@pytest.mark.parametrize("prefix", ["/abs/clip", "../clip", "edits/../../clip", ""])
def test_unsafe_prefixes_are_refused(tmp_path, prefix):
    with pytest.raises(ValueError, match="filename_prefix"):
        encode_video(index_clip(2), tmp_path, prefix, 12)


def test_encode_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown video format"):
        encode_video(index_clip(2), tmp_path, "x", 12, format="nope")
    with pytest.raises(ValueError, match="quality"):
        encode_video(index_clip(2), tmp_path, "x", 12, quality=99)
    with pytest.raises(ValueError, match="fps"):
        encode_video(index_clip(2), tmp_path, "x", 0)
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---- frame selection ---------------------------------------------------------------------------------

def nearest_in_time(n: int, src: Fraction, dst: Fraction) -> list[int]:
    """Reference: output frame k shows source frame ceil(k * src/dst - 1/2) (ties to the earlier frame)."""
    picks, k = [], 0
    while (j := math.ceil(k * src / dst - Fraction(1, 2))) < n:
        picks.append(j)
        k += 1
    return picks


@pytest.mark.parametrize("src,dst", [(24, 12), (24, 10), (30, 24), (25, 30), (24, 48), (30000 / 1001, 24)])
def test_resampling_picks_the_nearest_source_frame(src, dst):
    src_f = Fraction(src).limit_denominator(1001)
    dst_f = Fraction(dst).limit_denominator(1001)
    picked = list(select_frames(range(100), ratio=dst_f / src_f))
    assert picked == nearest_in_time(100, src_f, dst_f)


def test_selection_pulls_no_more_frames_than_needed():
    pulled = []

    def decoder():
        for i in range(1000):
            pulled.append(i)
            yield i

    assert list(select_frames(decoder(), skip_first=2, every_nth=3, frame_cap=4)) == [2, 5, 8, 11]
    assert len(pulled) == 12


@pytest.mark.parametrize("kwargs,expected,fps", [
    ({}, list(range(24)), 24),
    ({"skip_first": 5}, list(range(5, 24)), 24),
    ({"every_nth": 3}, list(range(0, 24, 3)), 8),
    ({"frame_cap": 4}, [0, 1, 2, 3], 24),
    ({"target_fps": 12}, list(range(0, 24, 2)), 12),
    ({"target_fps": 8}, list(range(0, 24, 3)), 8),
    ({"target_fps": 48, "frame_cap": 6}, [0, 0, 1, 1, 2, 2], 48),
    ({"skip_first": 3, "target_fps": 12, "every_nth": 2, "frame_cap": 3}, [3, 7, 11], 6),
])
def test_load_selects_exactly_these_frames(lossless24, kwargs, expected, fps):
    seen = []
    frames, info, _ = load_video(lossless24, progress=lambda done, total: seen.append((done, total)), **kwargs)
    assert indices_of(frames) == expected
    assert info["frame_count"] == len(expected) and info["fps"] == pytest.approx(fps)
    assert info["source_fps"] == 24 and info["source_frame_count"] in (24, None)
    assert info["duration"] == pytest.approx(len(expected) / fps)
    assert seen == [(i + 1, len(expected)) for i in range(len(expected))]


# ---- sizes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src,target,multiple,expected", [
    ((160, 90), (0, 0), 8, (160, 88)),
    ((160, 90), (100, 0), 8, (96, 56)),
    ((160, 90), (0, 64), 8, (112, 64)),
    ((160, 90), (200, 0), 64, (192, 64)),
    ((160, 90), (30, 0), 64, (64, 64)),
    ((1920, 1080), (512, 512), 64, (512, 512)),
])
def test_output_size_rounds_down_to_the_multiple(src, target, multiple, expected):
    assert output_size(*src, *target, multiple_of=multiple) == expected


@pytest.fixture(scope="module")
def gradient_clip(tmp_path_factory) -> str:
    """160x90, red rises left->right, green top->bottom (lossless)."""
    x = torch.linspace(0, 1, 160).view(1, 1, 160).expand(2, 90, 160)
    y = torch.linspace(0, 1, 90).view(1, 90, 1).expand(2, 90, 160)
    clip = torch.stack([x, y, torch.full_like(x, 1.0)], dim=-1)
    return encode_video(clip, tmp_path_factory.mktemp("grad"), "grad", 12, format="ffv1-mkv")


def test_crop_covers_the_target_and_keeps_the_centre(gradient_clip):
    frames, info, _ = load_video(gradient_clip, width=64, height=64, fit="crop")
    assert frames.shape == (2, 64, 64, 3) and (info["width"], info["height"]) == (64, 64)
    red = frames[0, 32, :, 0]
    # scaled to 114x64 and centre-cropped: columns span source x in about [35, 125] of 160
    assert red[0] == pytest.approx(35 / 159, abs=0.03) and red[-1] == pytest.approx(124 / 159, abs=0.03)
    green = frames[0, :, 32, 1]
    assert green[0] < 0.03 and green[-1] > 0.97  # full height kept
    assert frames[..., 2].min() > 0.95  # no black bars


def test_pad_fits_inside_with_centred_black_bars(gradient_clip):
    frames, _, _ = load_video(gradient_clip, width=64, height=64, fit="pad")
    assert frames.shape == (2, 64, 64, 3)
    blue = frames[0, :, 32, 2]
    # 160x90 -> 64x36 inside 64x64: 14 black rows above, 14 below
    assert blue[:14].max() == 0 and blue[-14:].max() == 0 and blue[14:50].min() > 0.95
    red = frames[0, 32, :, 0]
    assert red[0] < 0.03 and red[-1] > 0.97  # full width kept


def test_source_size_crop_only_trims_the_remainder(gradient_clip):
    frames, _, _ = load_video(gradient_clip, multiple_of=64)
    assert frames.shape == (2, 64, 128, 3)
    source = load_video(gradient_clip, multiple_of=1)[0]
    assert torch.equal(frames, source[:, 13:77, 16:144])  # pixel-exact centre crop, no resampling


def test_upscale_to_a_multiple_of_64(gradient_clip):
    frames, info, _ = load_video(gradient_clip, width=320, multiple_of=64)
    assert frames.shape == (2, 128, 320, 3)
    assert info["source_width"] == 160 and info["source_height"] == 90


# ---- errors ------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_video(tmp_path / "nope.mp4")


def test_folder_is_not_a_video(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        load_video(tmp_path)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="Cannot read bad.mp4"):
        load_video(bad)


def test_audio_only_file_has_no_video(tmp_path):
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(ValueError, match="no video stream"):
        load_video(path)


def test_skip_past_the_end(lossless24):
    with pytest.raises(ValueError, match="lower skip_first"):
        load_video(lossless24, skip_first=24)


def test_bad_arguments(lossless24):
    with pytest.raises(ValueError, match="every_nth"):
        load_video(lossless24, every_nth=0)
    with pytest.raises(ValueError, match="fit"):
        load_video(lossless24, fit="stretch")


# ---- the bundled sample clip -------------------------------------------------------------------------

def test_sample_clip_loads_with_audio_and_matches_its_facts():
    facts = json.loads((ASSETS / "sample_pan.json").read_text())
    frames, info, audio = load_video(ASSETS / "sample_pan.mp4")
    assert frames.shape[0] >= 16 and frames.shape[1:] == (192, 256, 3)
    assert (info["frame_count"], info["width"], info["height"]) == (facts["frame_count"], facts["width"], facts["height"])
    assert info["fps"] == facts["fps"]
    assert audio is not None
    assert audio["waveform"].shape[2] / audio["sample_rate"] == pytest.approx(facts["duration_s"], abs=0.02)
    assert abs(dominant_hz(audio) - 440) < 5
    assert (ASSETS / "sample_pan.mp4").stat().st_size <= 1_000_000


def test_sample_clip_moves_as_its_json_says():
    facts = json.loads((ASSETS / "sample_pan.json").read_text())
    dx, dy = facts["window_motion_px_per_frame"]["dx"], facts["window_motion_px_per_frame"]["dy"]
    frames = load_video(ASSETS / "sample_pan.mp4")[0]
    k, k1 = frames[:-1], frames[1:]
    h, w = frames.shape[1:3]

    def error(sx: int, sy: int) -> float:
        """Mean |frame_k(x, y) - frame_k+1(x - sx, y - sy)| over pixels inside both frames."""
        a = k[:, max(sy, 0):h + min(sy, 0), max(sx, 0):w + min(sx, 0)]
        b = k1[:, max(-sy, 0):h + min(-sy, 0), max(-sx, 0):w + min(-sx, 0)]
        return float((a - b).abs().mean())

    assert error(dx, dy) < 0.02  # only codec noise
    for wrong in [(0, 0), (-dx, -dy), (dx, 0), (0, dy), (dx + 1, dy)]:
        assert error(*wrong) > 3 * error(dx, dy)
