"""Bad input and Cancel: every case ends in one line naming node and input (before any work runs), with the
documented exit code, and nothing half-written is ever left under an output's name.

CPU only, tiny: the CLI runs in-process (`main([...])`) except where a real process is the point (Ctrl-C,
a read-only mount in its own mount namespace).
"""

import json
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from comfyui_video_edit.headless.cli import main
from comfyui_video_edit.headless.convert import read_json, to_api_prompt, ui_to_api
from comfyui_video_edit.headless.object_info import object_info
from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_video_edit.pipelines_core.models.model import VEModel, encode_prompt
from comfyui_video_edit.pipelines_core.models.tiny import write_tiny_tokenizer
from comfyui_video_edit.pipelines_core.video.encode import encode_video, encoder_layout, reserve_output_path
from comfyui_video_edit.pipelines_core.video.decode import load_video

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "sample_pan.mp4"
FACTS = json.loads((ROOT / "assets" / "sample_pan.json").read_text())
DEMO = ROOT / "workflows" / "sdedit_crossframe.json"


# --- helpers -------------------------------------------------------------------------------------------


def demo_api() -> dict:
    """The demo graph in API form: 1 Load Video, 2 Load Model, 3 Cross-Frame Sampler, 4 Video Encode."""
    return to_api_prompt(read_json(DEMO), object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS))


def load_encode_graph(video=SAMPLE, frame_cap=2, prefix="t/clip") -> dict:
    """Load Video -> Video Encode: no model, so a run takes a second."""
    return {
        "1": {"class_type": "VE_LoadVideo", "inputs": {
            "video": str(video), "frame_cap": frame_cap, "skip_first": 0, "every_nth": 1, "target_fps": 0.0,
            "width": 0, "height": 0, "multiple_of": "8", "fit": "crop"}},
        "2": {"class_type": "VE_VideoEncode", "inputs": {
            "frames": ["1", 0], "audio": ["1", 2], "video_info": ["1", 1], "fps": 0.0, "format": "h264-mp4",
            "quality": -1, "filename_prefix": prefix}},
    }


def write(tmp_path, data, name="wf.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))  # NaN / Infinity are written as JSON's usual extension, as ComfyUI reads
    return str(path)


def one_error_line(capsys) -> str:
    """stderr holds exactly one line, 'error: ...': nothing ran (a progress bar would add lines) and no
    traceback was printed."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # splitlines also splits tqdm's carriage returns
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def files_under(folder: Path) -> list[str]:
    """Files (not folders: validation may create an output's subfolder) under `folder`, hidden ones too."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def mono_wave(audio: dict) -> np.ndarray:
    return audio["waveform"][0, 0].numpy()


# --- nothing lost: outputs appear whole under their name, or not at all ---------------------------------


class Stop(Exception):
    pass


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Stop])
@pytest.mark.parametrize("fmt", ["ffv1-mkv", "png-sequence"])
def test_an_encode_stopped_midway_leaves_nothing_and_frees_its_number(tmp_path, fmt, interrupt):
    frames = torch.rand(4, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    seen = {}

    def progress(done, total):
        if done == 2:
            # While writing: the numbered name is held by an empty placeholder (another writer gets the next
            # number) and the frames go to the hidden .part beside it.
            final = sorted(p for p in (tmp_path / "v").iterdir() if not p.name.startswith("."))
            seen["final"] = [(p.name, p.is_dir() and not any(p.iterdir()) or p.is_file() and p.stat().st_size == 0)
                             for p in final]
            seen["parts"] = sorted(p.name for p in (tmp_path / "v").iterdir() if p.name.endswith(".part"))
            other = reserve_output_path(tmp_path, "v/clip", "txt")  # a second writer, same prefix
            seen["next"] = other.name
            other.unlink()
            raise interrupt()

    with pytest.raises(interrupt):
        encode_video(frames, tmp_path, "v/clip", 8, format=fmt, progress=progress)
    ext = "" if fmt == "png-sequence" else ".mkv"
    assert seen["final"] == [(f"clip_00001{ext}", True)]  # reserved, still empty
    assert seen["parts"] == [f".clip_00001{ext}.part"]
    assert seen["next"] == "clip_00002.txt"  # the number being written was not handed out twice
    assert files_under(tmp_path / "v") == [] and list((tmp_path / "v").iterdir()) == []  # nothing is left
    path = encode_video(frames, tmp_path, "v/clip", 8, format=fmt)
    assert Path(path).name == f"clip_00001{ext}"  # the number was given back
    assert ".part" not in "".join(files_under(tmp_path / "v"))


def test_outputs_follow_the_umask_and_never_replace_a_users_file(tmp_path):
    (tmp_path / "clip_00001.mp4").write_bytes(b"mine")
    old = os.umask(0o027)
    try:
        path = Path(encode_video(torch.rand(2, 16, 16, 3), tmp_path, "clip", 8))
    finally:
        os.umask(old)
    assert path.name == "clip_00002.mp4" and path.stat().st_size > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 & ~umask, as open() would create it
    assert (tmp_path / "clip_00001.mp4").read_bytes() == b"mine"


# --- audio follows the frames Load Video keeps -------------------------------------------------------------


@pytest.fixture(scope="module")
def full_clip():
    frames, info, audio = load_video(SAMPLE)
    assert (info["frame_count"], info["fps"]) == (FACTS["frame_count"], FACTS["fps"])
    return frames, info, audio


@pytest.mark.parametrize("kwargs, frames, fps", [
    ({"skip_first": 12}, 12, 12.0),
    ({"every_nth": 2}, 12, 6.0),
    ({"target_fps": 6}, 12, 6.0),
    ({"frame_cap": 5}, 5, 12.0),
    ({"skip_first": 6, "every_nth": 3, "frame_cap": 4}, 4, 4.0),
])
def test_audio_covers_exactly_the_kept_frames(full_clip, kwargs, frames, fps):
    _, _, full = full_clip
    out, info, audio = load_video(SAMPLE, **kwargs)
    rate = audio["sample_rate"]
    assert (out.shape[0], info["fps"]) == (frames, fps)
    assert info["duration"] == pytest.approx(frames / fps)
    assert audio["waveform"].shape[-1] == round(info["duration"] * rate)
    # It starts at the first kept frame's time: the same samples as the whole clip's audio from there.
    start = round(kwargs.get("skip_first", 0) / FACTS["fps"] * rate)
    expected = mono_wave(full)[start:start + audio["waveform"].shape[-1]]
    assert np.array_equal(mono_wave(audio), expected)


@pytest.mark.parametrize("every_nth, frames, fps", [(1000, 1, 0.5), (5, 5, 2.5)])
def test_every_nth_past_the_end_fits_the_frames_to_the_clip(tmp_path, every_nth, frames, fps):
    """Every kept frame stands for every_nth source frames, except the last when the clip ends first: the
    output spans the source (2 s), not frames x every_nth / fps (83 s for every_nth 1000)."""
    out, info, audio = load_video(SAMPLE, every_nth=every_nth)
    assert (out.shape[0], info["fps"], info["duration"]) == (frames, fps, FACTS["duration_s"])
    assert audio["waveform"].shape[-1] / audio["sample_rate"] == FACTS["duration_s"]
    path = encode_video(out, tmp_path, "nth", info["fps"], audio=audio)
    with av.open(path) as container:
        assert container.duration / av.time_base == pytest.approx(FACTS["duration_s"], abs=0.05)


def test_surround_audio_keeps_its_channels(tmp_path):
    rate = 16000
    t = torch.arange(rate) / rate
    wave = torch.stack([0.3 * torch.sin(2 * math.pi * (150 + 110 * c) * t) for c in range(6)])[None]
    frames = torch.rand(8, 16, 16, 3)
    lossless = encode_video(frames, tmp_path, "flac", 8, format="ffv1-mkv", audio={"waveform": wave,
                                                                                  "sample_rate": rate})
    _, _, audio = load_video(lossless)
    assert audio["waveform"].shape == (1, 6, rate)
    assert torch.allclose(audio["waveform"], wave, atol=1e-3)  # each channel where it was (not downmixed)
    with av.open(encode_video(frames, tmp_path, "aac", 8, audio={"waveform": wave, "sample_rate": rate})) as c:
        assert (c.streams.audio[0].channels, c.streams.audio[0].layout.name) == (6, "5.1")


@pytest.mark.skipif("mp2" not in av.codecs_available, reason="this FFmpeg build has no mp2 encoder")
def test_a_codec_that_cannot_keep_the_channels_says_it_downmixes(caplog):
    with caplog.at_level(logging.WARNING):
        assert encoder_layout("mp2", 6, 48000, "s16") == "stereo"
    (record,) = caplog.records
    assert "6 channels" in record.getMessage() and "downmixed to stereo" in record.getMessage()


# --- a damaged video says so ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def truncated_mp4(tmp_path_factory):
    """40 frames in a faststart mp4 (the frame count is in the header, at the front), cut at 90% of its bytes."""
    folder = tmp_path_factory.mktemp("cut")
    frames = torch.rand(40, 48, 64, 3, generator=torch.Generator().manual_seed(3))
    data = Path(encode_video(frames, folder, "whole", 12)).read_bytes()
    cut = folder / "cut.mp4"
    cut.write_bytes(data[:int(len(data) * 0.9)])
    return cut


def test_a_truncated_video_warns_how_many_frames_it_got(truncated_mp4, caplog):
    with caplog.at_level(logging.WARNING):
        frames, info, _ = load_video(truncated_mp4)
    assert 0 < frames.shape[0] < 40 and info["source_frame_count"] == frames.shape[0]
    (record,) = caplog.records
    assert f"ended after {frames.shape[0]} of the 40 frames" in record.getMessage()
    assert "cut.mp4" in record.getMessage()


def test_a_truncated_video_warns_in_one_line_headless(truncated_mp4, tmp_path, capsys):
    graph = load_encode_graph(video=truncated_mp4, frame_cap=0)
    assert main(["run", write(tmp_path, graph), "--output-dir", str(tmp_path / "out")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "of the 40 frames" in warnings[0] and "cut.mp4" in warnings[0]


# --- every bad input named, before anything runs ------------------------------------------------------------


def test_a_ui_link_from_a_node_missing_from_the_file_is_an_error(tmp_path, capsys):
    ui = read_json(DEMO)
    ui["nodes"] = [n for n in ui["nodes"] if n["id"] != 1]  # Load Video deleted; its links still lead to it
    assert main(["run", write(tmp_path, ui), "--output-dir", str(tmp_path)]) == 1
    line = one_error_line(capsys)
    assert "node 3" in line and "input 'images'" in line and "node 1, which is not in the file" in line
    # The API form of the same graph is refused too.
    api = demo_api()
    del api["1"]
    assert main(["run", write(tmp_path, api, "api.json"), "--output-dir", str(tmp_path)]) == 1
    assert "node 1, which is not in the workflow" in capsys.readouterr().err
    assert files_under(tmp_path) == ["api.json", "wf.json"]


def test_a_link_from_a_muted_node_still_goes_the_frontends_way():
    ui = read_json(DEMO)
    next(n for n in ui["nodes"] if n["id"] == 1)["mode"] = 2  # muted: the frontend drops its links
    prompt = ui_to_api(ui, object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS))
    assert "1" not in prompt and "images" not in prompt["3"]["inputs"]


@pytest.mark.parametrize("node, name, value", [("3", "cfg", float("nan")), ("3", "strength", float("inf")),
                                               ("4", "fps", float("nan")), ("1", "target_fps", -float("inf"))])
def test_non_finite_floats_are_refused(tmp_path, capsys, node, name, value):
    api = demo_api()
    api[node]["inputs"][name] = value
    assert main(["run", write(tmp_path, api), "--output-dir", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys)
    assert f"node {node} " in line and f"input '{name}'" in line and "is not a finite number" in line
    assert files_under(tmp_path / "out") == []


def test_an_infinite_whole_number_is_refused(tmp_path, capsys):
    assert main(["run", str(DEMO), "--output-dir", str(tmp_path), "--set", "3.steps=Infinity"]) == 1
    line = one_error_line(capsys)
    assert "node 3" in line and "input 'steps'" in line and "give a whole number" in line


def test_a_number_for_a_combo_of_strings_is_read_as_that_choice(tmp_path, capsys):
    graph = load_encode_graph()
    code = main(["run", write(tmp_path, graph), "--output-dir", str(tmp_path / "out"),
                 "--set", "1.multiple_of=64", "--set", "1.width=200"])
    assert code == 0, capsys.readouterr().err
    (path,) = capsys.readouterr().out.split()
    assert load_video(path)[1]["width"] == 192  # 200 rounded down to a multiple of 64 (8 would keep 200)


def test_a_value_for_a_link_only_input_is_refused(tmp_path, capsys):
    assert main(["run", str(DEMO), "--output-dir", str(tmp_path), "--set", "3.model=5"]) == 1
    line = one_error_line(capsys)
    assert "node 3" in line and "input 'model'" in line and "needs a link from a VE_MODEL output, not a value" in line


@pytest.mark.parametrize("name, content", [
    ("header.safetensors", (10 ** 12).to_bytes(8, "little") + b"{}"),  # a header length far past the file
    ("pointer.ckpt", b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"),  # text, not weights
])
def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(tmp_path, capsys, name, content):
    checkpoint = tmp_path / name
    checkpoint.write_bytes(content)
    write_tiny_tokenizer(str(tmp_path / "tokenizer"))  # found next to the file, so the file itself is read
    code = main(["run", str(DEMO), "--output-dir", str(tmp_path / "out"), "--set", "1.frame_cap=1",
                 "--set", f"2.checkpoint={checkpoint}"])
    assert code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: node 2") and f"'{checkpoint}' is not a valid checkpoint" in line
    assert "weights_only" not in line and "Traceback" not in line
    assert files_under(tmp_path / "out") == []


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """The tiny tokenizer (one token per byte) and a 2-layer CLIP text encoder: all encode_prompt reads."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer"))))
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    return VEModel(unet=None, vae=None, text_encoder=encoder.eval(), tokenizer=tokenizer, scheduler_config={},
                   source="test", device=torch.device("cpu"), dtype=torch.float32)


def test_a_prompt_past_77_tokens_says_how_many_were_dropped(text_model, caplog):
    with caplog.at_level(logging.WARNING):
        assert encode_prompt(text_model, "a" * 100).shape[1] == 77  # 100 bytes + start + end = 102 tokens
        encode_prompt(text_model, "a short prompt")
    (record,) = caplog.records
    assert "102 tokens" in record.getMessage() and "the last 25 are dropped" in record.getMessage()


# --- output folders that cannot be written: found before anything runs ---------------------------------------


def test_an_output_dir_that_is_a_file_is_refused_first(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    for target in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        assert main(["run", str(DEMO), "--output-dir", str(target)]) == 2
        line = one_error_line(capsys)
        assert f"--output-dir {target}" in line and "a file is in the way" in line


@pytest.mark.parametrize("prefix, expected", [
    ("../escape/clip", "may not contain '..'"),
    ("taken/clip", "a file is in the way"),
])
def test_a_prefix_that_cannot_be_written_is_refused_at_validation(tmp_path, capsys, prefix, expected):
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken").write_text("a file")
    assert main(["run", str(DEMO), "--output-dir", str(out), "--set", f"4.filename_prefix={prefix}"]) == 1
    line = one_error_line(capsys)  # one line, so the sampler never started (its progress bar would show)
    assert "node 4" in line and f"filename_prefix '{prefix}'" in line and expected in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits: chmod cannot deny root a write")
def test_a_folder_without_write_permission_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert main(["run", str(DEMO), "--output-dir", str(locked)]) == 2
        assert "Permission denied" in one_error_line(capsys)
    finally:
        locked.chmod(0o755)


READ_ONLY_SCRIPT = """
import json, sys
from comfyui_video_edit.headless.cli import main
from comfyui_video_edit.nodes import comfy_bridge
from comfyui_video_edit.nodes.video_encode import VE_VideoEncode
code = main(["run", sys.argv[1], "--output-dir", sys.argv[2] + "/out"])
with comfy_bridge.writing_to(sys.argv[2]):
    print(json.dumps({"code": code, "validate": VE_VideoEncode.VALIDATE_INPUTS(filename_prefix="edits/clip")}))
"""


def test_a_read_only_file_system_is_refused(tmp_path):
    """A real read-only mount, in a private mount namespace (unshare), since root can write anywhere else."""
    unshare = shutil.which("unshare")
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    if unshare is None or subprocess.run([unshare, "-rm", "mount", "-t", "tmpfs", "-o", "ro", "tmpfs",
                                          str(mount_point)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only file system here (needs unshare and user namespaces)")
    script = (f"mount -t tmpfs -o ro tmpfs {mount_point} && exec {sys.executable} -c '{READ_ONLY_SCRIPT}' "
              f"{DEMO} {mount_point}")
    run = subprocess.run([unshare, "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["code"] == 2
    assert f"error: --output-dir {mount_point}/out: cannot write there (Read-only file system)" in run.stderr
    assert "filename_prefix 'edits/clip'" in result["validate"] and "Read-only file system" in result["validate"]


# --- exit codes and Ctrl-C ----------------------------------------------------------------------------------


def test_help_documents_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for code, meaning in [("0", "done"), ("1", "cannot run"), ("2", "usage error"), ("130", "interrupted")]:
        assert any(line.split()[:1] == [code] and meaning in line for line in out.splitlines()), out


def test_ctrl_c_prints_one_line_and_exits_130_promptly(tmp_path):
    """SIGINT while Video Encode writes: one line, exit 130 at once, and no file under the output's name."""
    graph = load_encode_graph(frame_cap=0, prefix="t/clip")
    # 480 frames (the 24 source frames repeated by target_fps) through VP9, whose encoder takes seconds: the
    # signal lands midway through the file, with no model to build first. Unbuffered, so the progress bar's
    # first line (written with "\r", no newline) reaches us when it is written, not when the run ends.
    graph["1"]["inputs"].update(target_fps=240.0, width=256)
    graph["2"]["inputs"]["format"] = "webm"
    out = tmp_path / "out"
    command = [sys.executable, "-c", "import sys; from comfyui_video_edit.headless.cli import main; sys.exit(main())",
               "run", write(tmp_path, graph), "--output-dir", str(out)]
    # SIGINT back to its default in the child: a shell starts background jobs with SIGINT ignored, a child inherits
    # that, and Python installs its Ctrl-C handler only where SIGINT is not ignored at startup.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.set_blocking(process.stderr.fileno(), False)
    err, deadline = b"", time.monotonic() + 120
    while b"Video Encode:" not in err:  # the encoder has started writing
        assert process.poll() is None and time.monotonic() < deadline, err.decode()[-2000:]
        err += process.stderr.read() or b""
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    process.wait(timeout=60)
    elapsed = time.monotonic() - sent
    os.set_blocking(process.stderr.fileno(), True)
    err = (err + process.stderr.read()).decode()
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert elapsed < 3, f"took {elapsed:.1f} s to exit"
    assert files_under(out) == []  # neither the numbered file nor its .part
