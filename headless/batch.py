"""`video-edit batch SHOTS`: run many shots (a workflow + overrides each) as Ray tasks.

The driver (this command) reads and checks the whole SHOTS file, turns every shot into the API prompt
`video-edit run` would execute, skips the shots the output folder's manifest records as done with the
same inputs, and submits one Ray task per remaining shot. Ray decides where and when each runs; each
task executes its prompt into `<output-dir>/<shot>/` with the same functions `video-edit run` uses.

Ray is an optional dependency (`pip install "comfyui-video-edit[ray]"`): it is imported only when a
batch has shots to run, so the rest of the runner and a batch with nothing left to do need no Ray.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import gc
import hashlib
import io
import json
import os
import re
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import cli  # module import: cli imports this module too, and names are looked up at call time
from .convert import ConversionError, detect_format, read_json, to_api_prompt
from .execute import NodeExecutionError, OverrideSyntaxError, WorkflowError, apply_overrides, execute, parse_override
from .object_info import object_info

COLUMNS = ("shot", "workflow", "video", "prompt", "seed", "set")
MANIFEST_NAME = "batch_manifest.json"
MANIFEST_FORMAT = "video-edit-batch-manifest"
SHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Node classes whose results a worker keeps for the next shot: loading is the slow part of a small shot,
# and a loaded model is never changed by the nodes that use it (tests/test_shared_outputs.py).
CACHED_CLASSES = ("VE_LoadModel",)

SHOTS_HELP = """\
SHOTS is a .csv or .json file, one shot per row / object:

  shot      required; names the shot and its output folder <output-dir>/<shot>/
            (letters, digits, '.', '_', '-'; unique, also ignoring case)
  workflow  required; a workflow file (UI or API JSON), relative to the SHOTS file or absolute
  video     optional; like `run --video` (every Load Video node), relative to the SHOTS file or absolute
  prompt    optional; like `run --prompt` (every sampler node)
  seed      optional; like `run --seed`, a whole number
  set       optional; like `run --set NODE_ID.input=VALUE` (VALUE read as JSON when it parses):
            in CSV, entries separated by ';' (e.g. "3.steps=12; 3.cfg=6"); in JSON, a list of
            such strings or an object {"3.steps": 12, "3.cfg": 6}

CSV: a header row naming the columns, in any order; an empty cell means "not given".
JSON: a list of objects, or {"shots": [...]}; a missing key or null means "not given".
The whole file is checked before anything runs; each problem is printed on one line (exit 2).

Shots run as Ray tasks: locally (a Ray started by this command and stopped when it ends) or on a
cluster (--address ray://HOST:10001, or auto when run on a cluster node). On a cluster every node needs
this pack installed and the same paths for videos, models and the output folder (shared storage).
Each worker keeps the models its last shot loaded, so shots with the same Load Model inputs load once.

<output-dir>/batch_manifest.json records each finished shot with a fingerprint of its inputs (the
workflow after its overrides); a re-run skips those and runs the rest, and a shot whose workflow or
overrides changed runs again (writing new numbered files, never overwriting). --force runs all.
A changed file behind an unchanged path (a video re-exported in place) is not noticed: use --force.

Exit codes: 0 every shot done or skipped, 1 a shot failed (or Ray / the node pack is missing),
2 a problem in the SHOTS file or the command line."""


class ShotsError(ValueError):
    """Problems in a SHOTS file (or with the shots it describes), one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class RaySetupError(RuntimeError):
    """Ray is not installed, or cannot be started or reached."""


@dataclass
class Shot:
    name: str
    workflow: str  # absolute path
    where: str  # "line 3" / "entry 2", for messages
    video: str | None = None  # absolute path
    prompt: str | None = None
    seed: int | None = None
    sets: list[str] = field(default_factory=list)


@dataclass
class ShotResult:
    shot: str
    status: str  # done, skipped, failed
    seconds: float | None = None
    files: list[str] = field(default_factory=list)  # absolute paths
    error: str | None = None
    worker: str | None = None  # host:pid that ran it
    model_loads: int | None = None  # models that worker has loaded so far (its cache misses)
    details: str | None = None  # the worker's traceback, with --debug


# --- the SHOTS file ----------------------------------------------------------------------------


def add_batch_parser(commands, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `batch` to `video-edit`'s subcommands."""
    batch = commands.add_parser(
        "batch", parents=[common], help="run many shots (workflow + overrides each) through Ray",
        description="Run every shot of a SHOTS file as a Ray task, locally or on a Ray cluster.",
        epilog=SHOTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("shots", metavar="SHOTS", help="the shots: a .csv or .json file (format below)")
    batch.add_argument("--output-dir", default="output",
                       help="folder for the shots' folders and the manifest (default: ./output)")
    batch.add_argument("--address", metavar="ADDRESS",
                       help="Ray cluster to use: ray://HOST:10001 (Ray Client), auto (the cluster this node "
                            "belongs to) or HOST:PORT; default: start a local Ray for this command")
    batch.add_argument("--cpus-per-shot", type=_non_negative, default=1.0, metavar="N",
                       help="CPUs Ray reserves for each shot (default 1; fractions allowed)")
    batch.add_argument("--gpus-per-shot", type=_non_negative, default=0.0, metavar="N",
                       help="GPUs Ray reserves for each shot (default 0: shots see no GPU; 0.5 runs two "
                            "shots per GPU)")
    batch.add_argument("--force", action="store_true", help="run every shot, also those the manifest records")
    batch.add_argument("--worker-logs", action="store_true",
                       help="show the workers' output (progress bars, warnings) here")
    return batch


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: give 0 or more")
    return value


def read_shots(path: str) -> list[Shot]:
    """Every shot of a SHOTS file, checked; ShotsError lists all the problems found."""
    lower = path.lower()
    if not (lower.endswith(".csv") or lower.endswith(".json")):
        raise ShotsError([f"{path}: a SHOTS file ends in .csv or .json: rename it or convert it"])
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
            text = f.read()
    except OSError as exc:
        raise ShotsError([f"cannot read {path}: {exc.strerror or exc}"]) from exc
    base = os.path.dirname(os.path.abspath(path))
    rows, problems = (_csv_rows if lower.endswith(".csv") else _json_rows)(text, path)
    shots: list[Shot] = []
    for where, row in rows:
        shot = _shot(row, where, base, path, problems)
        if shot is not None:
            shots.append(shot)
    seen: dict[str, Shot] = {}
    for shot in shots:
        other = seen.setdefault(shot.name.lower(), shot)
        if other is not shot:  # folders differing only in case collide on macOS and Windows
            problems.append(f"{path}: shot '{shot.name}' ({shot.where}) has the name of shot '{other.name}' "
                            f"({other.where}): give every shot its own name")
    if not shots and not problems:
        problems.append(f"{path}: no shots: add one row per shot")
    if problems:
        raise ShotsError(problems)
    return shots


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, COLUMNS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown column '{name}': {hint}the columns are {', '.join(COLUMNS)}"


def _csv_rows(text: str, path: str) -> tuple[list[tuple[str, dict]], list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""))  # newline='': quoted cells may span lines
    header = next(reader, None)
    if header is None:
        return [], [f"{path}: the file is empty: start with a header row ({', '.join(COLUMNS)})"]
    names = [h.strip() for h in header]
    problems = [f"{path}: {_unknown(n)}" for n in names if n not in COLUMNS]
    problems += [f"{path}: column '{n}' appears twice: keep one (in CSV several set entries go in one "
                 "cell, separated by ';')" for n in sorted({n for n in names if names.count(n) > 1})]
    for required in ("shot", "workflow"):
        if required not in names:
            problems.append(f"{path}: no '{required}' column: add it to the header row")
    if problems:
        return [], problems  # cells cannot be matched to columns
    rows = []
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue
        where = f"line {reader.line_num}"
        if len(cells) > len(names):
            label = (cells[names.index("shot")].strip() or "?")
            problems.append(f"{path}: shot '{label}' ({where}) has {len(cells)} cells for {len(names)} "
                            "columns: quote cells that contain commas")
            continue
        row = {n: c.strip() for n, c in zip(names, cells) if c.strip()}
        if "set" in row:
            row["set"] = [s.strip() for s in row["set"].split(";") if s.strip()]
        rows.append((where, row))
    return rows, problems


def _json_rows(text: str, path: str) -> tuple[list[tuple[str, dict]], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"]
    if isinstance(data, dict) and set(data) == {"shots"}:
        data = data["shots"]
    if not isinstance(data, list):
        return [], [f"{path}: the JSON is not a list of shots: write [{{\"shot\": ..., \"workflow\": ...}}, ...]"]
    rows, problems = [], []
    for index, entry in enumerate(data, 1):
        where = f"entry {index}"
        if not isinstance(entry, dict):
            problems.append(f"{path}: {where} is not an object: write {{\"shot\": ..., \"workflow\": ...}}")
            continue
        label = entry.get("shot") if isinstance(entry.get("shot"), str) else "?"
        unknown = [k for k in entry if k not in COLUMNS]
        problems += [f"{path}: shot '{label}' ({where}): {_unknown(k)}" for k in unknown]
        if not unknown:
            rows.append((where, {k: v for k, v in entry.items() if v is not None}))
    return rows, problems


def _shot(row: dict, where: str, base: str, path: str, problems: list[str]) -> Shot | None:
    """A Shot from one row's given values (strings from CSV, JSON values from JSON); None if it has problems."""
    name = row.get("shot")
    label = name if isinstance(name, str) and name else "?"
    found: list[str] = []

    def problem(message: str) -> None:
        found.append(f"{path}: shot '{label}' ({where}): {message}")

    if not isinstance(name, str) or not name:
        problem("no shot name: give each shot a name (it names its output folder)")
    elif not SHOT_NAME.match(name) or name == MANIFEST_NAME:
        problem("the name is not usable as a folder name: use letters, digits, '.', '_' and '-' "
                "(starting with a letter or digit, at most 100)")
    workflow = row.get("workflow")
    if not isinstance(workflow, str) or not workflow:
        problem("no workflow: give the workflow file (relative to the SHOTS file, or absolute)")
        workflow = None
    else:
        workflow = os.path.join(base, os.path.expanduser(workflow))
        if not os.path.isfile(workflow):
            problem(f"workflow {workflow} does not exist: fix the path (relative to the SHOTS file, or absolute)")
    video = row.get("video")
    if video is not None and not (isinstance(video, str) and video):
        problem("video must be a path: give it as text")
        video = None
    elif video is not None:
        video = os.path.join(base, os.path.expanduser(video))  # checked where the shot runs
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        problem("prompt must be text: quote it")
    seed = row.get("seed")
    if isinstance(seed, str):
        try:
            seed = int(seed)
        except ValueError:
            problem(f"seed {seed!r} is not a whole number: give one like 42")
    elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        problem(f"seed {seed!r} is not a whole number: give one like 42")
    sets = _set_entries(row.get("set", []), problem)
    problems += found
    if found:
        return None
    return Shot(name, workflow, where, video, prompt, seed, sets)


def _set_entries(value: Any, problem) -> list[str]:
    """`set` as `NODE_ID.input=value` strings, each checked like `run --set`."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        value = [f"{k}={json.dumps(v)}" for k, v in value.items()]  # JSON text: "12" stays a string
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problem('set must be a list of "NODE_ID.input=value" strings, or an object {"NODE_ID.input": value}')
        return []
    for entry in value:
        try:
            parse_override(entry)
        except OverrideSyntaxError as exc:
            problem(f"set: {exc}")
    return list(value)


# --- turning shots into jobs -------------------------------------------------------------------


@dataclass
class Job:
    shot: Shot
    prompt: dict  # the API prompt to execute
    extra_pnginfo: Any
    fingerprint: str


def prepare_jobs(shots: list[Shot], nodes: str, path: str) -> list[Job]:
    """The prompt each shot runs: workflow + overrides, applied as `video-edit run` applies them.

    Done here, before anything runs, so a shot naming a missing node or input stops the batch at once.
    Input values (a missing video, a bad number) are checked where the shot runs, by the runner's own
    validation: on a cluster only the workers see their files.
    """
    mappings, display_names = cli.load_node_pack(nodes)
    info = lambda: object_info(mappings, display_names)  # noqa: E731 (built only for UI workflows)
    workflows: dict[str, Any] = {}
    jobs, problems = [], []
    for shot in shots:
        try:
            if shot.workflow not in workflows:
                data = read_json(shot.workflow)
                workflows[shot.workflow] = (data, to_api_prompt(data, info))
            data, prompt = workflows[shot.workflow]
            prompt = cli.apply_shortcuts(prompt, {"video": shot.video, "prompt": shot.prompt, "seed": shot.seed})
            prompt = apply_overrides(prompt, shot.sets, mappings)
        except (ConversionError, WorkflowError, OverrideSyntaxError) as exc:
            problems.append(f"{path}: shot '{shot.name}' ({shot.where}): {_one_line(exc)}")
            continue
        extra_pnginfo = {"workflow": data} if detect_format(data) == "ui" else None
        jobs.append(Job(shot, prompt, extra_pnginfo, fingerprint(prompt, nodes)))
    if problems:
        raise ShotsError(problems)
    return jobs


def fingerprint(prompt: dict, nodes: str) -> str:
    """Changes when what the shot computes changes: the prompt after overrides, and the node pack."""
    text = json.dumps({"prompt": prompt, "nodes": nodes}, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- the manifest ------------------------------------------------------------------------------


def read_manifest(output_dir: str, replace_broken: bool = False) -> dict:
    """{shot: entry} of the shots recorded as finished in `output_dir`; `replace_broken` (--force) reads
    an unreadable manifest as empty, so this run writes a new one."""
    path = os.path.join(output_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        if replace_broken:
            return {}
        raise ShotsError([f"cannot read the manifest {path} ({exc}): repair or delete it, or pass --force"]) from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("shots"), dict):
        raise ShotsError([f"{path} is not a video-edit batch manifest: move it away, or choose another --output-dir"])
    return data["shots"]


def write_manifest(output_dir: str, shots: dict) -> None:
    """Written whole to a temporary file, then renamed: an interrupted batch never leaves half a manifest."""
    path = os.path.join(output_dir, MANIFEST_NAME)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"format": MANIFEST_FORMAT, "version": 1, "shots": shots}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)


# --- the worker side ---------------------------------------------------------------------------

# Per worker process: Ray runs a worker's tasks one at a time, and keeps CPU workers alive between
# tasks (GPU ones too: the remote function sets max_calls=0), so these survive from shot to shot.
_MODEL_CACHE: dict[tuple, Any] = {}  # (class, inputs, IS_CHANGED, device) -> the node's result
_USED_THIS_SHOT: set[tuple] = set()
MODEL_LOADS = 0  # cache misses in this process: what the tests count
_PACKS: dict[str, dict] = {}  # node pack module -> its mappings with the cached loaders
_DEVICE: list[Any] = [None]  # the CUDA device index this shot was given, part of the cache key


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _cache_key(cls: type, inputs: dict) -> tuple | None:
    """What identifies a loader's result in this process; None when an input is an object (linked from
    another node), which has no safe key: that load is then not cached."""
    if not all(_plain(v) for v in inputs.values()):
        return None
    # IS_CHANGED (Load Model: the file's size and mtime) makes a checkpoint replaced on disk load again.
    changed = cls.IS_CHANGED(**inputs) if hasattr(cls, "IS_CHANGED") else None
    if not _plain(changed):
        return None
    return (cls.__module__, cls.__qualname__, _DEVICE[0], changed, tuple(sorted(inputs.items())))


def cached_loader(cls: type) -> type:
    """A subclass of a loader node whose results are kept per worker process, keyed by its inputs."""
    function = cls.FUNCTION

    def load(self, **inputs):
        global MODEL_LOADS
        key = _cache_key(cls, inputs)
        if key is None:
            return getattr(super(cached, self), function)(**inputs)
        _USED_THIS_SHOT.add(key)
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = getattr(super(cached, self), function)(**inputs)
            MODEL_LOADS += 1
        return _MODEL_CACHE[key]

    cached = type(cls.__name__, (cls,), {function: load, "__module__": cls.__module__,
                                         "__qualname__": cls.__qualname__})
    return cached


def _worker_mappings(nodes: str) -> dict:
    if nodes not in _PACKS:
        mappings, _ = cli.load_node_pack(nodes)
        _PACKS[nodes] = {name: cached_loader(cls) if name in CACHED_CLASSES else cls
                         for name, cls in mappings.items()}
    return _PACKS[nodes]


def _claim_assigned_gpu() -> int | None:
    """Point torch at the GPU Ray gave this shot.

    GPU shots run with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: a worker kept for its model cache may
    be given another GPU for its next shot, and CUDA reads CUDA_VISIBLE_DEVICES only once per process, so
    the worker sees the node's GPUs and selects the assigned one here instead.
    """
    import ray

    ids = ray.get_gpu_ids()
    if not ids:
        return None
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    index = [v.strip() for v in visible.split(",")].index(str(ids[0])) if visible else int(ids[0])
    torch.cuda.set_device(index)
    return index


def _release_unused_models(shot_done: bool) -> None:
    """Keep only the models the last finished shot used: memory stays bounded by one shot's models, and a
    model left on a GPU this worker no longer holds does not take memory Ray has given to another shot.
    A failed shot (a missing video, say) may have stopped before its Load Model: it evicts nothing."""
    unused = [k for k in _MODEL_CACHE if k not in _USED_THIS_SHOT] if shot_done else []
    _USED_THIS_SHOT.clear()
    if not unused:
        return  # nothing freed: skip the collection (most of a small shot's overhead otherwise)
    for key in unused:
        del _MODEL_CACHE[key]
    gc.collect()  # the model may sit in reference cycles (modules and their hooks)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_shot(job: dict) -> dict:
    """Run one prepared shot in this process (a Ray worker); a failure is returned, not raised."""
    start = time.perf_counter()
    reply = {"shot": job["shot"], "worker": f"{socket.gethostname()}:{os.getpid()}"}
    try:
        _DEVICE[0] = _claim_assigned_gpu() if job.get("gpus") else None
        mappings = _worker_mappings(job["nodes"])
        with cli.writing_to(job["output_dir"]):
            result = execute(job["prompt"], mappings, extra_pnginfo=job["extra_pnginfo"])
        reply.update(status="done", files=[os.path.abspath(p) for p in cli.written_files(result)])
        del result
    except Exception as exc:  # reported in the batch's table; the traceback travels with --debug
        reply.update(status="failed", error=_one_line(exc), files=[])
        if job.get("debug"):
            reply["details"] = traceback.format_exc()
    finally:
        _release_unused_models(reply.get("status") == "done")
    reply.update(seconds=time.perf_counter() - start, model_loads=MODEL_LOADS)
    return reply


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    named = isinstance(exc, (WorkflowError, NodeExecutionError, ConversionError, OverrideSyntaxError,
                             ShotsError, RaySetupError, cli.NodePackError))
    return text if named and text else f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the driver side ---------------------------------------------------------------------------


def ray_init_arguments(address: str | None, worker_logs: bool) -> dict:
    """ray.init's arguments: Ray Client (ray://) forwards anything else to the cluster, so it gets none."""
    if address and address.startswith("ray://"):
        return {"address": address}
    import logging

    arguments = {"address": address, "log_to_driver": worker_logs, "logging_level": logging.WARNING}
    if address is None:
        arguments["include_dashboard"] = False  # a local Ray for one command: no web server to start
    return arguments


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RaySetupError(f"video-edit batch needs Ray ({exc}): pip install \"comfyui-video-edit[ray]\"") from exc
    return ray


def run_batch(args: argparse.Namespace, report=None) -> list[ShotResult]:
    """Check the SHOTS file, skip the finished shots, run the others through Ray; a result per shot."""
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    shots = read_shots(args.shots)
    jobs = prepare_jobs(shots, args.nodes, args.shots)
    output_dir = os.path.abspath(args.output_dir)
    manifest = read_manifest(output_dir, replace_broken=args.force)
    finished = {} if args.force else dict(manifest)
    results: dict[str, ShotResult] = {}
    to_run: list[Job] = []
    for job in jobs:
        entry = finished.get(job.shot.name)
        if isinstance(entry, dict) and entry.get("fingerprint") == job.fingerprint:
            files = [os.path.join(output_dir, f) for f in entry.get("files", [])]
            results[job.shot.name] = ShotResult(job.shot.name, "skipped", files=files)
        else:
            to_run.append(job)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise ShotsError([f"--output-dir {output_dir}: cannot create it ({exc.strerror or exc}): "
                          "choose a folder you can write to"]) from exc
    if to_run:
        for result in _run_on_ray(to_run, args, output_dir, manifest, report):
            results[result.shot] = result
    return [results[job.shot.name] for job in jobs]


def _run_on_ray(jobs: list[Job], args, output_dir: str, manifest: dict, report):
    ray = _import_ray()
    started_here = not ray.is_initialized()  # a caller (or a test) may have connected already
    if started_here:
        report("starting a local Ray" if args.address is None else f"connecting to Ray at {args.address}")
        try:
            ray.init(**ray_init_arguments(args.address, args.worker_logs))
        except Exception as exc:  # unreachable address, Ray Client without grpcio, ...: one line, exit 1
            what = "start a local Ray" if args.address is None else f"reach Ray at {args.address}"
            raise RaySetupError(f"cannot {what}: {_one_line(exc)}") from exc
    pending: dict = {}
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus and not args.gpus_per_shot:
            report(f"note: Ray has {gpus:g} GPU(s) but --gpus-per-shot is 0, so the shots run on CPUs: "
                   "give --gpus-per-shot 1 to use them")
        # GPU shots: max_calls=0 keeps the worker (and its models) after a shot, which Ray does not do
        # for GPU tasks by default; NOSET lets the worker follow the GPU each later shot is given.
        # CPU shots on a cluster with GPUs: hide them, so a shot that reserved none cannot take memory
        # from one that did. Without GPUs no runtime env: Ray's already started workers can take shots.
        env = ({"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"} if args.gpus_per_shot
               else {"CUDA_VISIBLE_DEVICES": ""} if gpus else None)
        options = {"runtime_env": {"env_vars": env}} if env else {}
        remote = ray.remote(num_cpus=args.cpus_per_shot, num_gpus=args.gpus_per_shot, max_calls=0,
                            **options)(run_shot)
        for job in jobs:
            spec = {"shot": job.shot.name, "prompt": job.prompt, "extra_pnginfo": job.extra_pnginfo,
                    "output_dir": os.path.join(output_dir, job.shot.name), "nodes": args.nodes,
                    "gpus": args.gpus_per_shot, "debug": args.debug}
            pending[remote.remote(spec)] = job
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            result = _collect(ray, ready[0], job)
            done += 1
            if result.status == "done":
                manifest[job.shot.name] = {
                    "fingerprint": job.fingerprint, "seconds": round(result.seconds, 2), "worker": result.worker,
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "files": [os.path.relpath(f, output_dir) for f in result.files]}
                write_manifest(output_dir, manifest)  # after every shot: an interrupted batch keeps its work
            took = f" in {result.seconds:.1f} s" if result.seconds is not None else ""
            where = f" on {result.worker} (models loaded by that worker: {result.model_loads})" if result.worker else ""
            error = f": {result.error}" if result.status == "failed" else ""
            report(f"[{done}/{len(jobs)}] {job.shot.name}: {result.status}{took}{where}{error}")
            if result.details:
                report(result.details.rstrip())
            yield result
    finally:
        for ref in pending:  # interrupted (Ctrl-C, an error here): do not leave shots running
            ray.cancel(ref, force=True)
        if started_here:
            ray.shutdown()


def _collect(ray, ref, job: Job) -> ShotResult:
    try:
        reply = ray.get(ref)
    except ray.exceptions.RayError as exc:  # the worker died (out of memory, node lost) or Ray failed
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        return ShotResult(job.shot.name, "failed", error=f"{type(exc).__name__}: {first}" if first else
                          type(exc).__name__)
    return ShotResult(job.shot.name, reply["status"], seconds=reply["seconds"], files=reply["files"],
                      error=reply.get("error"), worker=reply.get("worker"), model_loads=reply.get("model_loads"),
                      details=reply.get("details"))


def format_table(results: list[ShotResult]) -> list[str]:
    rows = [("shot", "status", "seconds", "output")]
    for r in results:
        seconds = "-" if r.seconds is None else f"{r.seconds:.1f}"
        rows.append((r.shot, r.status, seconds, r.error if r.status == "failed" else ", ".join(r.files) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    lines.append(f"{len(results)} shot(s): {counts['done']} done, {counts['skipped']} skipped, "
                 f"{counts['failed']} failed")
    return lines


def batch_command(args: argparse.Namespace) -> int:
    """`video-edit batch`: 0 all done or skipped, 1 a shot failed, 2 a problem in the SHOTS file."""
    try:
        results = run_batch(args)
    except ShotsError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except RaySetupError as exc:
        if args.debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in format_table(results):
        print(line)
    return 1 if any(r.status == "failed" for r in results) else 0
