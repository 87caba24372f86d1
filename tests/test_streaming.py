"""Long clips in bounded memory: Load Video as Latents -> Sampler (latent) -> Video Encode (latent + model).

The streaming path must give exactly what the in-memory path (IMAGE batches) gives, and its peak memory must not
grow with the clip's length beyond the latents.
"""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from comfyui_video_edit.headless import execute, object_info, ui_to_api
from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_bridge
from comfyui_video_edit.nodes.comfy_video import ComponentsVideo, FileVideo
from comfyui_video_edit.nodes.load_video import VE_LoadVideo
from comfyui_video_edit.nodes.load_video_latents import CHUNK_FRAMES, VE_LoadVideoLatents
from comfyui_video_edit.nodes.video_encode import VE_VideoEncode
from comfyui_video_edit.pipelines_core.models.model import (decode_latent_stream, decode_latents, encode_frame_stream,
                                                      encode_frames, posterior_generators)
from comfyui_video_edit.pipelines_core.sampling.sampler import sample_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
from comfyui_video_edit.pipelines_core.sampling.starts import frame_generators
from comfyui_video_edit.pipelines_core.video.encode import encode_video
from comfyui_video_edit.pipelines_core.video.decode import load_video, open_video

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "assets" / "sample_pan.mp4")
INFO = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
# Two paths' files are compared in a lossless format, which decodes to exactly the frames each path handed the
# encoder (what these tests pin). Not h264: on AVX-512 CPUs libx264's output is not a function of its input (its
# AVX-512 code reads memory it never wrote, so the same frames give a different mp4 from one encode to the next
# in a process; with x264's asm limited to AVX2 it is the same every time).
LOSSLESS = "ffv1-mkv"


def decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


# --- (a) streaming == in memory -------------------------------------------------------------------------------

def test_open_video_streams_what_load_video_loads():
    """load_video is open_video collected: same frames, info and audio, whatever the batch size."""
    frames, info, audio = load_video(SAMPLE, frame_cap=13, every_nth=2, width=128)
    stream = open_video(SAMPLE, frame_cap=13, every_nth=2, width=128)
    assert stream.info is None  # known only once the frames have run out
    batches = list(stream.batches(5))
    assert [b.shape[0] for b in batches] == [5, 5, 2]
    assert torch.equal(torch.cat(batches), frames)
    assert stream.info == info and torch.equal(stream.audio["waveform"], audio["waveform"])
    with pytest.raises(RuntimeError, match="read once"):
        list(stream.frames())


def test_open_video_keeps_load_videos_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Video file not found"):
        open_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="No frames selected"):
        list(open_video(SAMPLE, skip_first=1000).batches())


def test_stream_encode_equals_encode_frames_bit_for_bit(tiny_model):
    """Batches of odd sizes are regrouped into encode_frames' VAE calls; posterior draws from seed + f."""
    frames = load_video(SAMPLE, frame_cap=11, width=64)[0]
    scaled = encode_frames(tiny_model, frames, frame_generators(7, 11))
    streamed = encode_frame_stream(tiny_model, frames.split(3), posterior_generators(7))
    assert streamed.dtype == torch.float32 and streamed.device.type == "cpu"
    assert torch.equal(streamed * tiny_model.vae_scale, scaled)
    means = encode_frame_stream(tiny_model, frames.split(5))
    assert torch.equal(means * tiny_model.vae_scale, encode_frames(tiny_model, frames))


def test_streamed_edit_is_bit_identical_to_the_in_memory_edit(tiny_model, tmp_path):
    """A clip longer than one chunk: stream-load -> sample (latent) -> stream-encode against load_video ->
    sample (images) -> decode_latents -> encode_video. Sampler output bit for bit; files decode the same."""
    count = 2 * CHUNK_FRAMES + 3
    settings = SamplerSettings("a watercolor painting", seed=11, steps=4, strength=0.5, chunk_size=6)

    frames, info, audio = load_video(SAMPLE, frame_cap=count, width=96)
    in_memory = sample_video(tiny_model, settings, images=frames)
    memory_file = encode_video(decode_latents(tiny_model, in_memory), tmp_path, "mem", info["fps"], format=LOSSLESS,
                               audio=audio)

    stream = open_video(SAMPLE, frame_cap=count, width=96)
    latent = {"samples": encode_frame_stream(tiny_model, stream.batches(CHUNK_FRAMES), posterior_generators(11))}
    streamed = sample_video(tiny_model, settings, latent=latent)
    unscaled = (streamed / tiny_model.vae_scale).float().cpu()  # the sampler node's LATENT output
    stream_file = encode_video(decode_latent_stream(tiny_model, unscaled, scaled=False), tmp_path, "stream",
                               stream.info["fps"], format=LOSSLESS, audio=stream.audio, frame_count=count)

    assert in_memory.shape[0] == count and torch.equal(streamed, in_memory)
    a, b = decoded(memory_file), decoded(stream_file)
    assert len(a) == len(b) == count and all(np.array_equal(x, y) for x, y in zip(a, b))
    wave_m, wave_s = load_video(memory_file)[2]["waveform"], load_video(stream_file)[2]["waveform"]  # FLAC: exact
    assert wave_m.shape[-1] > 0 and torch.equal(wave_m, wave_s)


def test_encode_video_takes_a_stream_of_batches_with_audio(tmp_path):
    """A stream of batches writes what the whole tensor writes; audio padded (or cut) to the video's length."""
    frames = torch.rand(9, 32, 48, 3, generator=torch.Generator().manual_seed(2))
    rate = 16000
    for seconds in (0.4, 2.0):  # shorter and longer than the 9 frames at 8 fps
        wave = torch.sin(torch.arange(int(seconds * rate)) / 7.0).view(1, 1, -1) * 0.3
        audio = {"waveform": wave, "sample_rate": rate}
        whole = encode_video(frames, tmp_path, f"whole{seconds}", 8, format="ffv1-mkv", audio=audio)
        parts = encode_video(iter(frames.split(4)), tmp_path, f"parts{seconds}", 8, format="ffv1-mkv", audio=audio)
        assert all(np.array_equal(x, y) for x, y in zip(decoded(whole), decoded(parts)))
        _, _, a = load_video(whole)
        _, _, b = load_video(parts)
        assert torch.equal(a["waveform"], b["waveform"])


def test_a_failing_stream_leaves_nothing(tmp_path):
    def batches():
        yield torch.rand(2, 16, 16, 3)
        raise RuntimeError("VAE failed")

    with pytest.raises(RuntimeError, match="VAE failed"):
        encode_video(batches(), tmp_path, "v/clip", 8)
    with pytest.raises(ValueError, match="changed size"):
        encode_video(iter([torch.rand(1, 16, 16, 3), torch.rand(1, 24, 16, 3)]), tmp_path, "v/clip", 8)
    with pytest.raises(ValueError, match="no frames"):
        encode_video(iter([]), tmp_path, "v/clip", 8)
    assert list((tmp_path / "v").iterdir()) == []


def _in_memory_graph(streaming: dict) -> dict:
    """The workflow's graph with Load Video -> Sampler(images) -> Video Encode(frames) in place of the latents."""
    graph = json.loads(json.dumps(streaming))
    loader = next(k for k, v in graph.items() if v["class_type"] == "VE_LoadVideoLatents")
    sampler = next(k for k, v in graph.items() if v["class_type"] == "VE_CrossFrameSampler")
    encoder = next(k for k, v in graph.items() if v["class_type"] == "VE_VideoEncode")
    inputs = graph[loader]["inputs"]
    for name in ("model", "seed"):
        inputs.pop(name)
    graph[loader] = {"class_type": "VE_LoadVideo", "inputs": inputs}
    graph[sampler]["inputs"].pop("latent")
    graph[sampler]["inputs"]["images"] = [loader, 0]
    for name in ("latent", "model"):
        graph[encoder]["inputs"].pop(name)
    graph[encoder]["inputs"]["frames"] = [sampler, 0]
    return graph


def test_long_clip_workflow_equals_the_in_memory_graph(tmp_path):
    """workflows/long_clip_edit.json against the same graph on IMAGE batches: same sampler output bit for bit,
    same frames in the written files, and the loader's seed is the sampler's."""
    api = ui_to_api(json.loads((ROOT / "workflows" / "long_clip_edit.json").read_text()), INFO)
    kinds = {v["class_type"]: k for k, v in api.items()}
    loader, sampler, encoder = kinds["VE_LoadVideoLatents"], kinds["VE_CrossFrameSampler"], kinds["VE_VideoEncode"]
    assert api[loader]["inputs"]["seed"] == api[sampler]["inputs"]["seed"]
    assert api[sampler]["inputs"]["latent"] == [loader, 0] and api[encoder]["inputs"]["latent"] == [sampler, 1]
    api[loader]["inputs"]["frame_cap"] = CHUNK_FRAMES + 2  # longer than one chunk, still quick
    api[sampler]["inputs"]["steps"] = 4
    api[encoder]["inputs"]["format"] = LOSSLESS
    streamed = execute(api, NODE_CLASS_MAPPINGS)
    in_memory = execute(_in_memory_graph(api), NODE_CLASS_MAPPINGS)
    assert torch.equal(streamed.outputs[sampler][1]["samples"], in_memory.outputs[sampler][1]["samples"])
    a, b = decoded(streamed.outputs[encoder][0]), decoded(in_memory.outputs[encoder][0])
    assert len(a) == CHUNK_FRAMES + 2 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert streamed.outputs[loader][1] == in_memory.outputs[loader][1]  # the same video_info


# --- (c) the nodes --------------------------------------------------------------------------------------------

def test_load_video_as_latents_shares_load_videos_widgets_in_order():
    ours, theirs = VE_LoadVideoLatents.INPUT_TYPES(), VE_LoadVideo.INPUT_TYPES()
    assert list(ours["required"])[:len(theirs["required"])] == list(theirs["required"])
    assert list(ours["required"])[len(theirs["required"]):] == ["model", "seed"]
    assert ours["optional"] == theirs["optional"]
    assert "sampler's seed" in ours["required"]["seed"][1]["tooltip"]
    assert VE_LoadVideoLatents.VALIDATE_INPUTS(video="no_such_clip.mp4") != True  # noqa: E712 (a message)
    assert VE_LoadVideoLatents.VALIDATE_INPUTS(video="sample_pan.mp4") is True


def test_load_video_as_latents_node(tiny_model):
    latent, info, audio = VE_LoadVideoLatents().load("sample_pan.mp4", 10, 0, 1, 0.0, 64, 0, "8", "crop",
                                                     tiny_model, 3)
    frames, ref_info, ref_audio = VE_LoadVideo().load("sample_pan.mp4", 10, 0, 1, 0.0, 64, 0, "8", "crop")
    assert info == ref_info and torch.equal(audio["waveform"], ref_audio["waveform"])
    want = encode_frames(tiny_model, frames, frame_generators(3, 10))
    assert torch.equal(latent["samples"] * tiny_model.vae_scale, want)


@pytest.fixture
def encode_node(tmp_path):
    node = VE_VideoEncode()

    def encode(fmt="h264-mp4", **sockets):
        return node.encode(fps=8.0, format=fmt, quality=-1, filename_prefix="v/clip", **sockets)

    return encode


def test_video_encode_needs_frames_or_latent_and_model(encode_node, tiny_model):
    latent = {"samples": torch.zeros(2, 4, 4, 4)}
    frames = torch.rand(2, 32, 32, 3)
    with pytest.raises(ValueError, match=r"^Video Encode: nothing to write: connect frames, or latent and model$"):
        encode_node()
    with pytest.raises(ValueError, match=r"^Video Encode: connect either frames or latent, not both"):
        encode_node(frames=frames, latent=latent, model=tiny_model)
    with pytest.raises(ValueError, match=r"^Video Encode: a latent needs the model whose VAE decodes it"):
        encode_node(latent=latent)
    with pytest.raises(ValueError, match="latent samples must be"):
        encode_node(latent={"samples": torch.zeros(2, 3, 4, 4)}, model=tiny_model)
    assert "frames" in VE_VideoEncode.INPUT_TYPES()["optional"]
    assert list(VE_VideoEncode.INPUT_TYPES()["optional"])[-2:] == ["latent", "model"]


def test_video_encode_from_a_latent(encode_node, tiny_model):
    """The latent decodes to the frames decode_latents gives; an mp4's VIDEO is the file, a PNG sequence's its
    frames read back (as the tooltip says)."""
    scaled = torch.randn(5, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    latent = {"samples": scaled / tiny_model.vae_scale}
    result = encode_node(latent=latent, model=tiny_model)["result"]
    assert isinstance(result[1], FileVideo)
    streamed = encode_node(LOSSLESS, latent=latent, model=tiny_model)["result"]
    ref = encode_node(LOSSLESS, frames=decode_latents(tiny_model, scaled))["result"]
    a, b = decoded(streamed[0]), decoded(ref[0])
    assert len(a) == len(b) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b))
    folder, video = encode_node("png-sequence", latent=latent, model=tiny_model)["result"]
    assert isinstance(video, ComponentsVideo) and video.get_components().images.shape == (5, 32, 48, 3)
    assert "held in memory" in VE_VideoEncode.OUTPUT_TOOLTIPS[1]


# --- (b) peak memory does not grow with the clip's length -------------------------------------------------------

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from comfyui_video_edit.pipelines_core.models.model import (load_model, encode_frame_stream, posterior_generators,
                                                      decode_latent_stream, decode_latents)
from comfyui_video_edit.pipelines_core.sampling.sampler import sample_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
from comfyui_video_edit.pipelines_core.video.decode import load_video, open_video
from comfyui_video_edit.pipelines_core.video.encode import encode_video

mode, clip, frames, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = load_model("builtin:tiny", device="cpu")
# One UNet step, no CFG batch: the test is about memory, not quality.
settings = SamplerSettings("a watercolor painting", seed=3, steps=2, strength=0.5, cfg=1.0, chunk_size=16)
start = time.perf_counter()
if mode == "stream":
    stream = open_video(clip, frame_cap=frames)
    latent = {"samples": encode_frame_stream(model, stream.batches(8), posterior_generators(settings.seed))}
    latents = sample_video(model, settings, latent=latent)
    unscaled = (latents / model.vae_scale).float().cpu()
    encode_video(decode_latent_stream(model, unscaled, scaled=False), out, "edit", stream.info["fps"],
                 audio=stream.audio, frame_count=unscaled.shape[0])
else:
    images, info, audio = load_video(clip, frame_cap=frames)
    latents = sample_video(model, settings, images=images)
    encode_video(decode_latents(model, latents), out, "edit", info["fps"], audio=audio)
wall = time.perf_counter() - start
try:
    with open("/proc/self/status") as f:  # VmHWM: the peak resident set, in kB
        peak_kb = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
except OSError:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
print(json.dumps({"peak_mb": peak_kb / 1024, "wall_s": wall, "frames": latents.shape[0]}))
"""


def start_child(mode: str, clip: Path, frames: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, str(clip), str(frames), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def peak_rss(child: subprocess.Popen, frames: int) -> dict:
    stdout, stderr = child.communicate(timeout=900)
    assert child.returncode == 0, stderr[-2000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["frames"] == frames
    return result


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """400 frames at 256x192 (a moving gradient), written as a stream: its IMAGE would be 236 MB of float32."""
    folder = tmp_path_factory.mktemp("long")
    y, x = torch.meshgrid(torch.linspace(0, 1, 192), torch.linspace(0, 1, 256), indexing="ij")

    def batches():
        for start in range(0, 400, 20):
            t = torch.arange(start, start + 20).view(-1, 1, 1) / 400
            yield torch.stack([(x + t) % 1, (y + 2 * t) % 1, (x * y + 3 * t) % 1], dim=-1)

    return Path(encode_video(batches(), folder, "long", 24, frame_count=400))


def test_peak_memory_of_the_streaming_path_does_not_grow_with_the_clip(long_clip, tmp_path):
    """Peak RSS of a 400-frame streamed edit is within 1.3x of a 40-frame one; the in-memory path, measured the
    same way, is not (so the bound can fail)."""
    # Four processes at once (one thread each): each measures its own peak, and the wall time is halved.
    children = {(mode, n): start_child(mode, long_clip, n, tmp_path / f"{mode}{n}")
                for mode in ("stream", "memory") for n in (40, 400)}
    stream_40, stream_400, memory_40, memory_400 = (peak_rss(children[key], key[1]) for key in
                                                    [("stream", 40), ("stream", 400), ("memory", 40), ("memory", 400)])
    report = (f"peak RSS MB: streaming 40 -> 400 frames {stream_40['peak_mb']:.0f} -> {stream_400['peak_mb']:.0f} "
              f"({stream_400['peak_mb'] / stream_40['peak_mb']:.2f}x); in memory {memory_40['peak_mb']:.0f} -> "
              f"{memory_400['peak_mb']:.0f} ({memory_400['peak_mb'] / memory_40['peak_mb']:.2f}x)")
    print(report)
    assert stream_400["peak_mb"] <= 1.3 * stream_40["peak_mb"], report
    assert memory_400["peak_mb"] > 1.3 * memory_40["peak_mb"], report
