"""Render the bundled sample clip: a camera pan over scikit-image's astronaut photograph.

Frame k is an exact crop of the photo, so the motion between frames is a known whole number of pixels:

    frame_k = astronaut()[Y0 + DY*k : Y0 + DY*k + HEIGHT, X0 + DX*k : X0 + DX*k + WIDTH]

The crop window moves right by DX and down by DY pixels per frame, so content at pixel (x, y) of frame k
appears at (x - DX, y - DY) in frame k+1. Writes sample_pan.mp4 (H.264 + AAC, via our own encoder) and
sample_pan.json (the facts) next to this script. Run: python assets/make_sample.py
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from skimage import data

from comfyui_video_edit.pipelines_core.video.decode import load_video
from comfyui_video_edit.pipelines_core.video.encode import encode_video

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT = 256, 192
FPS, FRAMES = 12, 24
X0, Y0 = 96, 64   # crop origin (left, top) of frame 0 in the photo
DX, DY = 3, 1     # window motion in pixels per frame (right, down)
CRF = 12
SAMPLE_RATE, TONE_HZ, FADE_S = 44100, 440.0, 0.25


def pan_frames(photo: np.ndarray) -> np.ndarray:
    """(FRAMES, HEIGHT, WIDTH, 3) uint8: the moving crop window."""
    crops = [photo[Y0 + DY * k: Y0 + DY * k + HEIGHT, X0 + DX * k: X0 + DX * k + WIDTH] for k in range(FRAMES)]
    return np.stack(crops)


def tone() -> np.ndarray:
    """Mono sine, as long as the clip, with linear fade in and out (no clicks)."""
    n = round(FRAMES / FPS * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    fade = np.clip(np.minimum(t, t[-1] - t) / FADE_S, 0, 1)
    return (0.3 * np.sin(2 * math.pi * TONE_HZ * t) * fade).astype(np.float32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


def main() -> None:
    photo = data.astronaut()
    frames = pan_frames(photo)
    audio = {"waveform": torch.from_numpy(tone()).view(1, 1, -1), "sample_rate": SAMPLE_RATE}
    with tempfile.TemporaryDirectory() as tmp:
        written = encode_video(torch.from_numpy(frames).float() / 255, tmp, "sample_pan", FPS,
                               format="h264-mp4", quality=CRF, audio=audio)
        shutil.copyfile(written, HERE / "sample_pan.mp4")

    decoded, info, decoded_audio = load_video(HERE / "sample_pan.mp4")
    decoded_u8 = (decoded.numpy() * 255).round().astype(np.uint8)
    assert decoded_u8.shape == frames.shape, (decoded_u8.shape, frames.shape)
    assert decoded_audio is not None, "the sample clip lost its audio track"

    facts = {
        "file": "sample_pan.mp4",
        "source_image": "skimage.data.astronaut() (512x512 RGB)",
        "fps": FPS,
        "frame_count": FRAMES,
        "width": WIDTH,
        "height": HEIGHT,
        "duration_s": FRAMES / FPS,
        "crop_origin_frame0": {"x": X0, "y": Y0},
        "window_motion_px_per_frame": {"dx": DX, "dy": DY},
        "frame_formula": "frame_k = astronaut()[y0 + dy*k : y0 + dy*k + height, x0 + dx*k : x0 + dx*k + width]",
        "convention": ("x grows to the right, y grows down. The crop window moves by (+dx, +dy) per frame, so "
                       "the content at pixel (x, y) in frame k appears at (x - dx, y - dy) in frame k+1."),
        "forward_flow_px": {"u": -DX, "v": -DY,
                            "meaning": "flow from frame k to frame k+1: frame_k(x, y) == frame_k+1(x + u, y + v)"},
        "backward_flow_px": {"u": DX, "v": DY,
                             "meaning": "flow from frame k+1 to frame k: frame_k+1(x, y) == frame_k(x + u, y + v)"},
        "valid_region": ("pixels of frame k whose content is still inside frame k+1: x >= dx and y >= dy; "
                         "the right/bottom strips of frame k+1 are new content"),
        "video_codec": f"h264 (libx264) yuv420p, crf {CRF}, BT.709",
        "decoded_psnr_db_vs_exact_crops": round(psnr(decoded_u8, frames), 2),
        "audio": {"codec": "aac", "sample_rate": SAMPLE_RATE, "channels": 1,
                  "content": f"{TONE_HZ:g} Hz sine, amplitude 0.3, {FADE_S} s linear fade in and out",
                  "duration_s": FRAMES / FPS},
        "made_by": "assets/make_sample.py",
    }
    (HERE / "sample_pan.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    size_kb = (HERE / "sample_pan.mp4").stat().st_size / 1024
    print(f"wrote sample_pan.mp4 ({size_kb:.0f} KiB, {info['frame_count']} frames {info['width']}x{info['height']} "
          f"@ {info['fps']} fps, PSNR {facts['decoded_psnr_db_vs_exact_crops']} dB) and sample_pan.json")


if __name__ == "__main__":
    main()
