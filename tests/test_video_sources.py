"""Video sources beyond a file: a folder of images, a VIDEO (ComfyUI's core type) and a BytesIO stream.

Tiny clips written in tmp_path; CPU only. The last test runs against a real ComfyUI checkout when COMFYUI_PATH
names one (skipped otherwise, as in CI).
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_video_edit.headless import execute
from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, comfy_bridge
from comfyui_video_edit.nodes.load_video import VE_LoadVideo
from comfyui_video_edit.nodes.video_encode import VE_VideoEncode
from comfyui_video_edit.pipelines_core.video.decode import image_files, load_video

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STEP = 20  # index colour: frame i has red = STEP * i
# Load Video's widgets, in order, at their "take everything as it is" values.
AS_IS = dict(frame_cap=0, skip_first=0, every_nth=1, target_fps=0.0, width=0, height=0, multiple_of="8", fit="crop")


def index_frame(i: int, h: int = 16, w: int = 24) -> np.ndarray:
    """A flat uint8 frame whose red channel says its index."""
    frame = np.empty((h, w, 3), np.uint8)
    frame[...] = (STEP * i, 255 - STEP * i, 128)
    return frame


def indices_of(frames: torch.Tensor) -> list[int]:
    red = frames[:, frames.shape[1] // 2, frames.shape[2] // 2, 0] * 255
    return [round(float(r) / STEP) for r in red]


def write_pngs(folder: Path, frames, names=None) -> Path:
    """Frames as PNG files with Pillow (the loader reads with OpenCV: two libraries, one truth)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / (names[i] if names else f"frame_{i:04d}.png"))
    return folder


def tone(seconds: float, rate: int = 16000) -> dict:
    t = torch.arange(round(seconds * rate)) / rate
    return {"waveform": (0.3 * torch.sin(2 * math.pi * 440 * t)).view(1, 1, -1), "sample_rate": rate}


# ---- a folder of images --------------------------------------------------------------------------------

def test_png_folder_gives_the_source_frames_exactly(tmp_path):
    source = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    folder = write_pngs(tmp_path / "shot", source)
    frames, info, audio = load_video(folder)
    assert torch.equal(frames, torch.from_numpy(source).float() / 255)
    assert (info["frame_count"], info["source_frame_count"], info["fps"]) == (5, 5, 24.0)  # default rate
    assert (info["width"], info["height"], info["path"]) == (24, 16, str(folder))
    assert audio is None


def test_frames_follow_natural_name_order(tmp_path):
    order = [1, 2, 10, 11, 3]  # written out of order; plain sorting would give 1, 10, 11, 2, 3
    folder = write_pngs(tmp_path / "seq", [index_frame(i) for i in order], [f"frame_{i}.png" for i in order])
    (folder / "._frame_4.png").write_bytes(b"macOS resource fork, not an image")
    (folder / "notes.txt").write_text("not a frame")
    assert [p.name for p in image_files(folder)] == ["frame_1.png", "frame_2.png", "frame_3.png", "frame_10.png",
                                                     "frame_11.png"]
    frames, _, _ = load_video(folder)
    assert indices_of(frames) == [1, 2, 3, 10, 11]


@pytest.mark.parametrize("kwargs, expected, fps", [
    ({}, [0, 1, 2, 3, 4, 5], 12.0),
    ({"target_fps": 24}, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5], 24.0),  # the folder's 12 fps, resampled
    ({"target_fps": 6}, [0, 2, 4], 6.0),
    ({"skip_first": 1, "every_nth": 2, "frame_cap": 2}, [1, 3], 6.0),
])
def test_folder_plays_at_the_given_fps_and_selection_applies(tmp_path, kwargs, expected, fps):
    folder = write_pngs(tmp_path / "f", [index_frame(i) for i in range(6)])
    frames, info, _ = load_video(folder, fps=12, **kwargs)
    assert indices_of(frames) == expected
    assert (info["fps"], info["source_fps"]) == (fps, 12.0)


def test_folder_is_resized_like_a_video(tmp_path):
    folder = write_pngs(tmp_path / "f", [index_frame(i, h=40, w=60) for i in range(2)])
    frames, info, _ = load_video(folder, width=32, multiple_of=16, fit="pad")
    assert frames.shape == (2, 16, 32, 3) and (info["source_width"], info["source_height"]) == (60, 40)


def test_16_bit_png_and_float_exr_keep_their_precision(tmp_path):
    folder = tmp_path / "hdr"
    folder.mkdir()
    deep = np.random.default_rng(1).integers(0, 65536, (8, 16, 3), dtype=np.uint16)
    cv2.imwrite(str(folder / "a_1.png"), deep[..., ::-1])  # OpenCV writes BGR
    linear = np.random.default_rng(2).uniform(-0.5, 1.5, (8, 16, 3)).astype(np.float32)
    # EXR written by FFmpeg's encoder through PyAV (it takes (H, W, 3) RGB for the planar float format)
    cc = av.CodecContext.create("exr", "w")
    cc.width, cc.height, cc.pix_fmt, cc.time_base = 16, 8, "gbrpf32le", Fraction(1)
    packets = cc.encode(av.VideoFrame.from_ndarray(linear, format="gbrpf32le")) + cc.encode(None)
    (folder / "a_2.exr").write_bytes(b"".join(bytes(p) for p in packets))
    frames, _, _ = load_video(folder)
    assert torch.allclose(frames[0], torch.from_numpy(deep.astype(np.float32) / 65535), atol=1e-7)
    assert torch.equal(frames[1], torch.from_numpy(linear).clamp(0, 1))  # HDR clipped to IMAGE's 0..1


def test_folder_without_images_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"holds no images \(png, jpg, jpeg, webp, bmp, tif, tiff, exr\)"):
        load_video(tmp_path)
    (tmp_path / "readme.txt").write_text("no frames here")
    with pytest.raises(ValueError, match="holds no images") as err:
        load_video(tmp_path)
    assert "not found" not in str(err.value) and "\n" not in str(err.value)


def test_images_of_different_sizes_name_the_odd_one(tmp_path):
    frames = [index_frame(0), index_frame(1), index_frame(2, w=32), index_frame(3, w=40)]
    folder = write_pngs(tmp_path / "mixed", frames)
    with pytest.raises(ValueError, match=r"^frame_0002\.png is 32x16 but frame_0000\.png is 24x16"):
        load_video(folder)
    assert indices_of(load_video(folder, frame_cap=2)[0]) == [0, 1]  # frames never read are never judged


def test_unreadable_image_is_named(tmp_path):
    folder = write_pngs(tmp_path / "bad", [index_frame(0)])
    (folder / "frame_0001.png").write_bytes(b"\x89PNG but truncated")
    with pytest.raises(ValueError, match=r"^Cannot read frame_0001\.png as an image"):
        load_video(folder)


# ---- the Load Video node and folders -------------------------------------------------------------------

def test_node_accepts_a_folder_and_its_cache_key_follows_the_files(tmp_path):
    folder = write_pngs(tmp_path / "shot", [index_frame(i) for i in range(3)])
    assert VE_LoadVideo.VALIDATE_INPUTS(video=str(folder)) is True
    before = VE_LoadVideo.IS_CHANGED(video=str(folder), **AS_IS)
    assert before and VE_LoadVideo.IS_CHANGED(video=str(folder), **AS_IS) == before
    write_pngs(folder, [index_frame(3)], ["frame_0003.png"])
    added = VE_LoadVideo.IS_CHANGED(video=str(folder), **AS_IS)
    assert added != before
    # Rewritten in place (a different size on disk): the folder's own mtime may not move, the key must.
    write_pngs(folder, [np.random.default_rng(3).integers(0, 256, (16, 24, 3), dtype=np.uint8)], ["frame_0001.png"])
    assert VE_LoadVideo.IS_CHANGED(video=str(folder), **AS_IS) != added
    frames, info, _ = VE_LoadVideo().load(str(folder), **AS_IS, fps=12.0)
    assert frames.shape[0] == 4 and info["fps"] == 12.0


def test_node_rejects_an_empty_folder_with_the_loader_message(tmp_path):
    message = VE_LoadVideo.VALIDATE_INPUTS(video=str(tmp_path))
    assert isinstance(message, str) and "holds no images (png, jpg" in message and "not found" not in message


def test_fps_is_a_socket_so_saved_widget_values_keep_their_places():
    """The upload button's value is saved after every widget: a new widget would take it ("video")."""
    optional = VE_LoadVideo.INPUT_TYPES()["optional"]
    assert list(optional) == ["video_input", "fps"]
    assert optional["video_input"][0] == "VIDEO" and optional["fps"][1]["forceInput"] is True


# ---- VIDEO in and out ----------------------------------------------------------------------------------

def encode_node(tmp_path, frames, fmt, audio=None, fps=12.0):
    out = VE_VideoEncode().encode(frames, fps, fmt, -1, "rt/clip", audio=audio)
    assert VE_VideoEncode.RETURN_TYPES[-1] == "VIDEO" and len(out["result"]) == len(VE_VideoEncode.RETURN_TYPES)
    return out["result"]


def test_video_output_feeds_load_video_headless(tmp_path):
    frames = torch.from_numpy(np.stack([index_frame(i, 48, 64) for i in range(6)])).float() / 255
    path, video = encode_node(tmp_path, frames, "h264-mp4", audio=tone(2.0))
    assert video.get_stream_source() == path
    # The connected VIDEO wins over the chosen file (the bundled clip: 256x192, its own fps).
    out, info, audio = VE_LoadVideo().load("sample_pan.mp4", **AS_IS, video_input=video)
    assert out.shape == (6, 48, 64, 3) and indices_of(out) == list(range(6))
    assert (info["fps"], info["frame_count"]) == (12.0, 6)
    assert audio is not None and audio["waveform"].shape[-1] == pytest.approx(16000 * 6 / 12, abs=2)


def test_png_sequence_video_carries_its_frames_fps_and_audio(tmp_path):
    frames = torch.rand(4, 16, 24, 3, generator=torch.Generator().manual_seed(4))
    path, video = encode_node(tmp_path, frames, "png-sequence", audio=tone(1.0), fps=8.0)
    assert Path(path).is_dir()
    out, info, audio = VE_LoadVideo().load("", **AS_IS, video_input=video)
    assert torch.equal(out, frames)  # the frames themselves: no 8-bit rounding on the way
    assert info["fps"] == 8.0 and audio["waveform"].shape[-1] == 16000 * 4 // 8


def test_folder_to_encode_to_video_to_load_runs_as_a_graph(tmp_path):
    """Headless executor: VIDEO link type checks, and a connected VIDEO makes a bad file choice harmless."""
    source = np.random.default_rng(5).integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    folder = write_pngs(tmp_path / "in", source)
    prompt = {
        "1": {"class_type": "VE_LoadVideo", "inputs": {"video": str(folder), **AS_IS, "fps": 6.0}},
        "2": {"class_type": "VE_VideoEncode", "inputs": {
            "frames": ["1", 0], "fps": 0.0, "format": "ffv1-mkv", "quality": -1, "filename_prefix": "g/clip",
            "video_info": ["1", 1]}},
        "3": {"class_type": "VE_LoadVideo", "inputs": {"video": "no_such_clip.mp4", **AS_IS, "video_input": ["2", 1]}},
    }
    with comfy_bridge.writing_to(str(tmp_path / "out")):
        result = execute(prompt, NODE_CLASS_MAPPINGS, outputs=["2", "3"])
    assert torch.equal(result.outputs["3"][0], torch.from_numpy(source).float() / 255)  # ffv1 is lossless
    assert result.outputs["3"][1]["fps"] == 6.0


def test_a_bytesio_stream_decodes_as_the_path_does():
    clip = ASSETS / "sample_pan.mp4"

    class StreamVideo:  # a VIDEO whose stream source is in memory, as comfy_api's VideoFromFile(BytesIO)
        def get_stream_source(self):
            return io.BytesIO(clip.read_bytes())

    by_path = VE_LoadVideo().load(str(clip), **{**AS_IS, "frame_cap": 3})
    by_stream = VE_LoadVideo().load("", **{**AS_IS, "frame_cap": 3}, video_input=StreamVideo())
    assert torch.equal(by_stream[0], by_path[0])
    facts = {k: v for k, v in by_path[1].items() if k != "path"}  # a stream has no path
    assert {k: v for k, v in by_stream[1].items() if k != "path"} == facts and by_stream[1]["path"] is None
    assert torch.equal(by_stream[2]["waveform"], by_path[2]["waveform"])


# ---- a real ComfyUI --------------------------------------------------------------------------------------

COMFY_SCRIPT = textwrap.dedent("""
    import io, json, os, sys
    from fractions import Fraction
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    try:
        from comfy.cli_args import args
        args.cpu = True  # ComfyUI sets up its device on import; this test needs no GPU
        import folder_paths
        import comfy.model_management
        from comfy_api.latest import InputImpl, Types
    except ImportError as exc:
        print(f"comfy_api is not importable from COMFYUI_PATH: {exc}")
        sys.exit(77)
    import torch
    from comfyui_video_edit.nodes import comfy_bridge
    from comfyui_video_edit.nodes.load_video import VE_LoadVideo
    from comfyui_video_edit.nodes.video_encode import VE_VideoEncode

    folder_paths.set_output_directory(sys.argv[1])
    assert comfy_bridge.in_comfyui()
    frames = torch.rand(4, 16, 24, 3, generator=torch.Generator().manual_seed(0))
    wave = {"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}
    as_is = dict(frame_cap=0, skip_first=0, every_nth=1, target_fps=0.0, width=0, height=0, multiple_of="8",
                 fit="crop")
    report = {}
    for fmt in ("ffv1-mkv", "png-sequence"):
        path, video = VE_VideoEncode().encode(frames, 8.0, fmt, -1, "c/" + fmt, audio=wave)["result"]
        out, info, audio = VE_LoadVideo().load("", **as_is, video_input=video)
        report[fmt] = [type(video).__name__, bool(torch.equal(out, (frames * 255).round() / 255)),
                       bool(torch.equal(out, frames)), info["fps"], audio is not None]
        if fmt == "ffv1-mkv":
            data = open(path, "rb").read()
    for name, video in [("file_bytesio", InputImpl.VideoFromFile(io.BytesIO(data))),
                        ("components", InputImpl.VideoFromComponents(
                            Types.VideoComponents(images=frames, frame_rate=Fraction(8), audio=wave)))]:
        out, info, audio = VE_LoadVideo().load("", **as_is, video_input=video)
        report[name] = [type(video).__name__, bool(torch.equal(out, (frames * 255).round() / 255)),
                        bool(torch.equal(out, frames)), info["fps"], audio is not None]
    print(json.dumps(report))
""")


def test_real_comfyui_video_objects_feed_load_video(tmp_path):
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        pytest.skip("COMFYUI_PATH is not set (a ComfyUI checkout to test comfy_api's VIDEO against)")
    # A separate process: importing ComfyUI's modules would make every later test run "inside ComfyUI".
    run = subprocess.run([sys.executable, "-c", COMFY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "COMFYUI_PATH": comfyui}, timeout=300)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    # ffv1 stores 8-bit pixels: the file's frames are the input rounded to 8 bits.
    assert report["ffv1-mkv"] == ["VideoFromFile", True, False, 8.0, True]
    assert report["file_bytesio"] == ["VideoFromFile", True, False, 8.0, True]
    # A PNG sequence is a folder: it travels as its frames, like Create Video's output.
    assert report["png-sequence"] == ["VideoFromComponents", False, True, 8.0, True]
    assert report["components"] == ["VideoFromComponents", False, True, 8.0, True]
