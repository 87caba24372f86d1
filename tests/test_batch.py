"""`video-edit batch`: shots through a local Ray with two CPU workers, on builtin:tiny.

Skipped where Ray (the `ray` extra) is not installed.
"""

import json
import logging
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from comfyui_video_edit.headless import batch  # noqa: E402
from comfyui_video_edit.headless.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "workflows" / "sdedit_crossframe.json"
SAMPLE = REPO / "assets" / "sample_pan.mp4"
# The demo graph's node 1 is Load Video, 3 the Cross-Frame Sampler: two frames, two steps.
QUICK = ["1.frame_cap=2", "3.steps=2"]
PROGRESS = re.compile(r"\] (\S+): (done|failed) in [\d.]+ s on (\S+) \(models loaded by that worker: (\d+)\)")
MAX_SOCKET_ROOT = 44  # Ray's socket paths (root + session name + /sockets/plasma_store) must stay under 107 bytes


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray with two CPU workers; its session files, auth token and the workers' temporary files
    stay under pytest's temporary folder, and it is shut down after this file's tests."""
    root = tmp_path_factory.mktemp("ray")
    sockets = root if len(str(root)) <= MAX_SOCKET_ROOT else Path(tempfile.mkdtemp(prefix="ve_ray_"))
    (root / "tmp").mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))  # otherwise Ray writes one to ~/.ray/auth_token
        env.setenv("TMPDIR", str(root / "tmp"))  # the workers inherit it (builtin:tiny writes a tokenizer there)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 _temp_dir=str(sockets))
        try:
            yield
        finally:
            ray.shutdown()
            if sockets != root:
                shutil.rmtree(sockets, ignore_errors=True)


def write_shots(folder: Path, shots, name="shots.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(shots) if name.endswith(".json") else shots)
    return path


def shot(name, **values):
    return {"shot": name, "workflow": "demo.json", "set": QUICK, **values}


def table(out: str) -> dict:
    """The final table: shot -> (status, last column)."""
    rows = {}
    for line in out.strip().splitlines()[1:-1]:
        name, status, _seconds, output = line.split(None, 3)
        rows[name] = (status, output)
    return rows


def test_batch_reports_each_shot_and_reruns_only_what_is_not_done(local_ray, tmp_path, capsys):
    shutil.copy(DEMO, tmp_path / "demo.json")  # a workflow path relative to the SHOTS file
    out = tmp_path / "out"
    shots = [shot("a"), shot("b", seed=7), shot("c", video="missing.mp4")]
    path = write_shots(tmp_path, shots)
    progress = []

    # First run: two shots done, one failed with its one-line reason; exit 1.
    assert main(["batch", str(path), "--output-dir", str(out)]) == 1
    captured = capsys.readouterr()
    progress += PROGRESS.findall(captured.err)
    rows = table(captured.out)
    assert [rows[s][0] for s in "abc"] == ["done", "done", "failed"]
    assert "missing.mp4" in rows["c"][1]  # Load Video's one-line reason, naming the file
    first = {s: Path(rows[s][1]) for s in "ab"}
    for s in "ab":
        assert first[s].is_file() and first[s].parent.parent == out / s  # <output-dir>/<shot>/video_edit/...
    manifest = json.loads((out / batch.MANIFEST_NAME).read_text())["shots"]
    assert sorted(manifest) == ["a", "b"]

    # Same file again: the two done shots are skipped, only the failed one runs (and fails) again.
    assert main(["batch", str(path), "--output-dir", str(out)]) == 1
    captured = capsys.readouterr()
    progress += PROGRESS.findall(captured.err)
    rows = table(captured.out)
    assert [rows[s][0] for s in "abc"] == ["skipped", "skipped", "failed"]
    assert rows["a"][1] == str(first["a"])
    assert [p[0] for p in PROGRESS.findall(captured.err)] == ["c"]

    # c's video fixed and b's seed changed, as CSV: a is skipped, b runs again beside its first file.
    csv = ("shot,workflow,video,seed,set\n"
           f"a,demo.json,,,{'; '.join(QUICK)}\n"
           f"b,demo.json,,8,{'; '.join(QUICK)}\n"
           f"c,demo.json,{SAMPLE},,{'; '.join(QUICK)}\n")
    assert main(["batch", str(write_shots(tmp_path, csv, "shots.csv")), "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    progress += PROGRESS.findall(captured.err)
    rows = table(captured.out)
    assert [rows[s][0] for s in "abc"] == ["skipped", "done", "done"]
    assert Path(rows["b"][1]) != first["b"] and first["b"].is_file()  # never overwritten
    assert captured.out.strip().endswith("3 shot(s): 2 done, 1 skipped, 0 failed")

    # --force runs a recorded shot again.
    assert main(["batch", str(write_shots(tmp_path, [shot("a")], "a.json")), "--output-dir", str(out),
                 "--force"]) == 0
    captured = capsys.readouterr()
    progress += PROGRESS.findall(captured.err)
    assert table(captured.out)["a"][0] == "done"
    assert len(list((out / "a").rglob("*.mp4"))) == 2

    # The per-worker model cache: every worker process loaded the model once, whatever it ran.
    done = [(name, worker, int(loads)) for name, status, worker, loads in progress if status == "done"]
    assert len(done) == 5
    workers = {worker for _, worker, _ in done}
    assert all(loads == 1 for _, _, loads in done), progress
    assert len(workers) < len(done)  # so some worker ran two shots on one load


def test_shots_file_problems_stop_the_batch_before_anything_runs(tmp_path, capsys, monkeypatch):
    shutil.copy(DEMO, tmp_path / "demo.json")

    def no_ray(*args, **kwargs):
        raise AssertionError("the batch started although its SHOTS file has problems")

    monkeypatch.setattr(batch, "_run_on_ray", no_ray)
    csv = ("shot,workflow,promt,set\n"
           "a,demo.json,,3.steps=2\n")
    out = ["--output-dir", str(tmp_path / "out")]  # never created: nothing starts
    assert main(["batch", str(write_shots(tmp_path, csv, "columns.csv")), *out]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'columns.csv'}: unknown column 'promt': did you mean 'prompt'? "
        "the columns are shot, workflow, video, prompt, seed, set"]

    shots = [shot("a"), {"shot": "b", "workflow": "nowhere.json"}, shot("c", set=["3steps=2"]),
             shot("d", set={"9.steps": 2}), shot("A", seed="x"), shot("e/1")]
    assert main(["batch", str(write_shots(tmp_path, shots)), *out]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith(f"error: {tmp_path / 'shots.json'}: shot '") for line in lines)
    text = "\n".join(lines)
    assert "shot 'b' (entry 2): workflow " in text and "nowhere.json does not exist: fix the path" in text
    assert "shot 'c' (entry 3): set: bad override '3steps=2': write NODE_ID.input=value" in text
    assert "shot 'A' (entry 5): seed 'x' is not a whole number" in text
    assert "shot 'e/1' (entry 6): the name is not usable as a folder name" in text
    # Checked once the file itself is sound: a node the workflow lacks (and a name differing only in case).
    shots = [shot("a"), shot("d", set={"9.steps": 2}), shot("A")]
    assert main(["batch", str(write_shots(tmp_path, shots)), *out]) == 2
    text = capsys.readouterr().err
    assert "shot 'A' (entry 3) has the name of shot 'a' (entry 1)" in text
    shots = [shot("a"), shot("d", set={"9.steps": 2})]
    assert main(["batch", str(write_shots(tmp_path, shots)), *out]) == 2
    assert "shot 'd' (entry 2): --set 9.steps=2: there is no node 9" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_loader_cache_loads_once_per_process_and_keeps_only_the_last_shots_models(monkeypatch):
    monkeypatch.setattr(batch, "_MODEL_CACHE", {})
    monkeypatch.setattr(batch, "_USED_THIS_SHOT", set())
    monkeypatch.setattr(batch, "MODEL_LOADS", 0)

    class Loader:
        FUNCTION = "load"

        def load(self, checkpoint, dtype):
            return (object(),)

    cached = batch.cached_loader(Loader)
    first = cached().load(checkpoint="m1", dtype="fp32")
    batch._release_unused_models(shot_done=True)
    assert cached().load(checkpoint="m1", dtype="fp32") is first and batch.MODEL_LOADS == 1
    batch._release_unused_models(shot_done=False)  # a failed shot evicts nothing
    assert cached().load(checkpoint="m2", dtype="fp32") is not first and batch.MODEL_LOADS == 2
    batch._release_unused_models(shot_done=True)  # that shot used m2 only: m1 goes
    assert cached().load(checkpoint="m1", dtype="fp32") is not first and batch.MODEL_LOADS == 3


def test_ray_is_started_locally_or_reached_by_address():
    local = batch.ray_init_arguments(None, worker_logs=False)
    assert local["address"] is None and local["include_dashboard"] is False and local["log_to_driver"] is False
    assert "include_dashboard" not in batch.ray_init_arguments("auto", worker_logs=True)
    # Ray Client hands any other argument to the cluster's own ray.init: give it the address only.
    assert batch.ray_init_arguments("ray://head:10001", worker_logs=False) == {"address": "ray://head:10001"}
