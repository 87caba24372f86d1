"""Run every shipped workflow in a real ComfyUI, one after another in one server, and report.

    python scripts/comfyui_check.py /path/to/ComfyUI [--python /path/to/ComfyUI/venv/bin/python]

Run it with (or point --python at) a Python that has ComfyUI's requirements and this pack's. It:
1. links this pack into `ComfyUI/custom_nodes/` (unless a folder there already is this pack; it never
   replaces anything), and removes the link again at the end;
2. starts `main.py --cpu` on a free loopback port, with its output, temp and user folders in a fresh
   temporary folder (the checkout's own folders are not touched);
3. checks the pack imported (no `IMPORT FAILED` line naming it, every node of the pack in `/object_info`);
4. converts each workflow in `workflows/` with the pack's UI->API converter against the server's own
   `/object_info`, queues it with `POST /prompt` and follows it on the websocket: ok/error with
   ComfyUI's message, seconds, progress events, the output file and the `ui` preview entry;
5. compares each output's decoded frames with the same workflow run headless (a fresh process), so a
   graph that inherits state from an earlier graph in the same server shows up as a difference (both sides
   write ffv1-mkv, lossless, so the comparison is exact; see LOSSLESS);
6. re-queues the first workflow unchanged (everything must come from ComfyUI's cache, no new file),
   then with another seed, cancels it during sampling, queues it again and compares that run with
   headless too (an interrupted run must leave no state behind);
7. stops the server by its pid and prints one table. Exit status 0 only when every row passed.

Nothing is downloaded: the workflows use the pack's built-in tiny model and bundled sample clip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_PACKAGE = "comfyui_video_edit"
LINK_NAME = "comfyui_video_edit"
DEMO = "sdedit_crossframe"
# --quick: fewer frames and steps (the graphs themselves unchanged), for a first look in minutes.
QUICK = {"VE_LoadVideo": {"frame_cap": 6}, "VE_CrossFrameSampler": {"steps": 6}, "VE_DDIMInvert": {"steps": 6}}
# Outputs are compared with headless pixel for pixel, so both sides write a lossless format: libx264's AVX-512
# code does not give the same bitstream twice in one process on some CPUs, so two h264 files of the same frames
# can differ by tens of levels (the pack's tests encode h264 on their own).
LOSSLESS = ("VE_VideoEncode", "format", "ffv1-mkv")

# Imports the pack from its folder the way ComfyUI does (a package named after nothing installed), then
# runs its headless command line: the reference each ComfyUI run is compared with.
HEADLESS_BOOTSTRAP = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location({pkg!r}, {init!r}, submodule_search_locations=[{root!r}])
module = importlib.util.module_from_spec(spec)
sys.modules[{pkg!r}] = module
spec.loader.exec_module(module)
from {pkg}.headless.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Row:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    message: str = ""
    files: list[str] = field(default_factory=list)
    preview: dict = field(default_factory=dict)
    progress_events: int = 0
    cached_nodes: int = 0
    same_as_headless: str = "-"

    @property
    def passed(self) -> bool:
        return self.status == "ok" and self.same_as_headless in ("yes", "-")


# --- the server -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def link_pack(comfyui: Path) -> Path | None:
    """Link this pack into custom_nodes; None when a folder there already is this pack."""
    custom_nodes = comfyui / "custom_nodes"
    for entry in custom_nodes.iterdir():
        if entry.resolve() == PACK_DIR:
            return None
    link = custom_nodes / LINK_NAME
    if link.exists() or link.is_symlink():
        raise SystemExit(f"{link} exists and is not this pack: move it away or run the check from that copy")
    link.symlink_to(PACK_DIR, target_is_directory=True)
    return link


class Server:
    def __init__(self, comfyui: Path, python: str, work: Path, timeout: float):
        self.comfyui, self.python, self.work, self.timeout = comfyui, python, work, timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = work / "output"
        self.log_path = work / "comfyui.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        for name in ("output", "temp", "user", "input"):
            (self.work / name).mkdir(parents=True, exist_ok=True)
        command = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--output-directory", str(self.output_dir),
                   "--temp-directory", str(self.work / "temp"), "--user-directory", str(self.work / "user"),
                   "--input-directory", str(self.work / "input"),
                   "--database-url", f"sqlite:///{self.work / 'user' / 'comfyui.db'}"]
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                self.get("/system_stats")
                return
            time.sleep(0.5)
        raise SystemExit(f"ComfyUI did not answer within {self.timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:  # /prompt answers 400 with the validation errors
            return exc.code, json.loads(exc.read() or b"{}")
        return 200, json.loads(text) if text else {}


# --- running one prompt ---------------------------------------------------------------------------


async def run_prompt(server: Server, prompt: dict, workflow: dict, row: Row, timeout: float,
                     cancel_at_progress: int | None = None) -> None:
    """Queue `prompt` and follow it on the websocket until it ends; fill in `row`."""
    import aiohttp  # ComfyUI's own requirement

    client_id = uuid.uuid4().hex
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            code, answer = server.post("/prompt", {"prompt": prompt, "client_id": client_id,
                                                   "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
            if code != 200 or answer.get("node_errors"):
                row.status, row.message = "rejected", _validation_message(answer)
                return
            prompt_id = answer["prompt_id"]
            while True:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    server.post("/interrupt", {"prompt_id": prompt_id})
                    row.status, row.message = "timeout", f"no end after {timeout:.0f} s"
                    return
                try:
                    message = await ws.receive(timeout=remaining)
                except asyncio.TimeoutError:
                    continue
                if message.type != aiohttp.WSMsgType.TEXT:
                    if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        row.status, row.message = "error", "the websocket closed"
                        return
                    continue  # binary previews
                event = json.loads(message.data)
                kind, data = event.get("type"), event.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "progress":
                    row.progress_events += 1
                    if cancel_at_progress is not None and row.progress_events == cancel_at_progress:
                        server.post("/interrupt", {"prompt_id": prompt_id})
                elif kind == "execution_cached":
                    row.cached_nodes = len(data.get("nodes") or [])
                elif kind == "execution_error":
                    row.status = "error"
                    row.message = (f"node {data.get('node_id')} ({data.get('node_type')}): "
                                   f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}")
                    break
                elif kind == "execution_interrupted":
                    row.status, row.message = "interrupted", f"at node {data.get('node_id')} ({data.get('node_type')})"
                    break
                elif kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                                     and data.get("prompt_id") == prompt_id):
                    row.status = "ok"
                    break
    row.seconds = time.monotonic() - started
    _read_outputs(server, await finished_entry(server, prompt_id), row)


async def finished_entry(server: Server, prompt_id: str, wait: float = 30.0) -> dict:
    """The prompt's /history entry; the worker stores it a moment after the last websocket event."""
    deadline = time.monotonic() + wait
    while True:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None or time.monotonic() > deadline:
            return entry or {}
        await asyncio.sleep(0.2)


def _read_outputs(server: Server, history: dict, row: Row) -> None:
    """The files output nodes wrote, and their `ui` preview entry, from a /history entry."""
    for ui in (history.get("outputs") or {}).values():
        for key, items in ui.items():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    row.preview = {"key": key, **item}
                    if item.get("type") == "output":
                        row.files.append(str(server.output_dir / (item.get("subfolder") or "") / item["filename"]))


def _validation_message(answer: dict) -> str:
    parts = []
    for node_id, problem in (answer.get("node_errors") or {}).items():
        for error in problem.get("errors", []):
            parts.append(f"node {node_id} ({problem.get('class_type')}): {error.get('message')}: "
                         f"{error.get('details', '')}")
    return "; ".join(parts) or str(answer.get("error", {}).get("message", answer))


# --- the canvas (real frontend in headless Chromium) ------------------------------------------------


class Canvas:
    """ComfyUI's own frontend in headless Chromium (Playwright driving a browser already installed).

    Each workflow is loaded with `app.loadGraphData`, converted by the frontend's own `app.graphToPrompt()`
    and queued from the page, so the canvas receives the run's progress and previews as a user sees them.
    """

    def __init__(self, server: Server, chromium: str, shots: Path):
        self.server, self.chromium, self.shots = server, chromium, shots

    async def __aenter__(self):
        from playwright.async_api import async_playwright

        self.server.post("/settings", {"Comfy.TutorialCompleted": True})  # no first-run tour over the canvas
        self._playwright = await async_playwright().start()
        self.browser = await self._playwright.chromium.launch(
            executable_path=self.chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                 "--disable-component-update", "--no-first-run"])
        self.page = await self.browser.new_page(viewport={"width": 1600, "height": 1000})
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        await self.page.goto(self.server.url + "/", wait_until="networkidle")
        await self.page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=60_000)
        return self

    async def __aexit__(self, *exc):
        await self.browser.close()
        await self._playwright.stop()

    async def load(self, ui: dict) -> tuple[list[str], dict]:
        """(node types the canvas does not know, the frontend's own API prompt) for a UI workflow."""
        return await self.page.evaluate("""async (ui) => {
            await window.app.loadGraphData(ui, true, true, "check");
            const known = window.LiteGraph.registered_node_types;
            const missing = window.app.graph.nodes.filter((n) => !known[n.type]).map((n) => n.type);
            const prompt = await window.app.graphToPrompt();
            return [missing, prompt.output];
        }""", ui)

    async def queue(self, ui: dict, prompt: dict) -> dict:
        return await self.page.evaluate("""async ([ui, prompt]) =>
            await window.app.api.queuePrompt(0, {output: prompt, workflow: ui})""", [ui, prompt])

    async def screenshot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        await self.page.screenshot(path=str(path))
        return path


async def run_in_canvas(canvas: Canvas, ui: dict, ours: dict, row: Row, timeout: float) -> dict:
    """Load, convert and queue one workflow in the real frontend; fill in `row`; the frontend's prompt."""
    missing, prompt = await canvas.load(ui)
    if missing:
        row.status, row.message = "error", f"the canvas does not know {', '.join(sorted(set(missing)))}"
        return prompt
    if json.loads(json.dumps(prompt)) != json.loads(json.dumps(ours)):  # 0 == 0.0 after parsing
        row.message = "the frontend's API form differs from the pack's converter; "
    started = time.monotonic()
    answer = await canvas.queue(ui, prompt)
    prompt_id = answer.get("prompt_id")
    if not prompt_id or answer.get("node_errors"):
        row.status, row.message = "rejected", row.message + _validation_message(answer)
        return prompt
    entry = await finished_entry(canvas.server, prompt_id, timeout)
    if entry.get("status", {}).get("completed") is None:
        canvas.server.post("/interrupt", {"prompt_id": prompt_id})
        row.status, row.message = "timeout", f"no end after {timeout:.0f} s"
        return prompt
    row.seconds = time.monotonic() - started
    status = entry["status"]
    if status.get("status_str") == "success":
        row.status = "ok"
    else:
        row.status = "error"
        for event, data in status.get("messages", []):
            if event == "execution_error":
                row.message += (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                                f"{data.get('exception_message', '').strip()}")
    row.progress_events = -1  # followed by the page, not by this script
    _read_outputs(canvas.server, entry, row)
    await asyncio.sleep(1.0)  # let the canvas draw the previews before the picture
    row.message += f"screenshot {(await canvas.screenshot(row.name)).name}"
    return prompt


# --- comparing with headless ------------------------------------------------------------------------


def run_headless(python: str, workflow: Path, out_dir: Path, sets: list[str]) -> list[str]:
    init = str(PACK_DIR / "__init__.py")
    code = HEADLESS_BOOTSTRAP.format(pkg=PACK_PACKAGE, init=init, root=str(PACK_DIR))
    argv = [python, "-c", code, "run", str(workflow), "--output-dir", str(out_dir)]
    for item in sets:
        argv += ["--set", item]
    done = subprocess.run(argv, cwd=out_dir, capture_output=True, text=True)  # cwd: no `comfy` importable
    if done.returncode != 0:
        raise RuntimeError(f"headless run failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return [line for line in done.stdout.splitlines() if line.strip()]


def decoded_frames(path: str):
    import av  # ComfyUI's own requirement
    import numpy as np

    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def compare_with_headless(python: str, workflow: Path, row: Row, work: Path, sets: list[str]) -> None:
    if row.status != "ok" or not row.files:
        return
    out_dir = Path(tempfile.mkdtemp(prefix="headless_", dir=work))
    try:
        reference = run_headless(python, workflow, out_dir, sets)
    except RuntimeError as exc:
        row.same_as_headless, row.message = "no", str(exc)
        return
    ours, theirs = decoded_frames(row.files[0]), decoded_frames(str(out_dir / reference[0]))
    if ours.shape == theirs.shape and (ours == theirs).all():
        row.same_as_headless = "yes"
    else:
        diff = "shapes differ" if ours.shape != theirs.shape else \
            f"max pixel difference {int(abs(ours.astype(int) - theirs.astype(int)).max())}"
        row.same_as_headless, row.message = "no", f"differs from the headless run: {diff}"


# --- the check --------------------------------------------------------------------------------------


def load_converter():
    """The pack's UI->API converter, from its files: the `headless` package needs nothing but the standard
    library, so it is loaded on its own, under a private name (the pack itself needs torch)."""
    import importlib.util

    folder = PACK_DIR / "headless"
    spec = importlib.util.spec_from_file_location("_ve_headless", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package  # its modules' relative imports and dataclasses look it up there
    spec.loader.exec_module(package)
    return importlib.import_module("_ve_headless.convert")


def check_import(server: Server, object_info: dict, workflows: list[Path]) -> Row:
    row = Row("pack import")
    log = server.log_path.read_text(errors="replace")
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and LINK_NAME in line]
    timing = re.search(r"^\s*([\d.]+) seconds(?: \(IMPORT FAILED\))?: .*(" + re.escape(str(PACK_DIR)) + "|"
                       + re.escape(LINK_NAME) + r")\s*$", log, re.M)
    ours = sorted(name for name, info in object_info.items() if info.get("python_module", "").startswith("custom_nodes."))
    used = {node["type"] for path in workflows for node in json.loads(path.read_text())["nodes"]}
    missing = sorted(t for t in used if t.startswith("VE_") and t not in object_info)
    row.seconds = float(timing.group(1)) if timing else 0.0
    if failed or missing or not any(n.startswith("VE_") for n in ours):
        row.status = "error"
        row.message = "; ".join(failed) or f"node types missing from /object_info: {', '.join(missing) or 'all'}"
    else:
        row.status = "ok"
        row.message = f"{sum(n.startswith('VE_') for n in ours)} VE_ nodes in /object_info"
    return row


def _set_input(prompt: dict, class_type: str, name: str, value) -> list[str]:
    """Set `name` on every node of `class_type`; the matching headless --set arguments."""
    sets = []
    for node_id, entry in prompt.items():
        if entry["class_type"] == class_type and name in entry["inputs"]:
            entry["inputs"][name] = value
            sets.append(f"{node_id}.{name}={json.dumps(value)}")
    return sets


def lossless_widgets(ui: dict, prompt: dict) -> None:
    """The LOSSLESS format in the canvas file too (the canvas converts the file itself): each encoder's format
    widget value, found by its value (a format name is unique among the node's widget values)."""
    class_type, name, value = LOSSLESS
    for node in ui["nodes"]:
        entry = prompt.get(str(node["id"]))
        if node["type"] == class_type and entry is not None:
            values = node["widgets_values"]
            values[values.index(entry["inputs"][name])] = value


async def check(args: argparse.Namespace) -> list[Row]:
    comfyui = Path(args.comfyui).resolve()
    if not (comfyui / "main.py").is_file() or not (comfyui / "custom_nodes").is_dir():
        raise SystemExit(f"{comfyui} is not a ComfyUI checkout (no main.py and custom_nodes/)")
    # The demo last: the cache check re-queues it right after, while ComfyUI's cache still holds that graph
    # (the default cache keeps what the latest prompt used).
    workflows = sorted((PACK_DIR / "workflows").glob("*.json"), key=lambda p: (p.stem == DEMO, p.stem))
    if args.workflow:
        workflows = [w for w in workflows if w.stem in args.workflow]
    convert = load_converter()
    work = Path(tempfile.mkdtemp(prefix="comfyui_check_"))
    link = link_pack(comfyui)
    server = Server(comfyui, args.python, work, args.start_timeout)
    rows: list[Row] = []
    stack = contextlib.AsyncExitStack()
    try:
        server.start()
        object_info = server.get("/object_info")
        rows.append(check_import(server, object_info, workflows))
        if rows[0].status != "ok":
            return rows
        canvas = None
        if args.canvas:
            canvas = await stack.enter_async_context(Canvas(server, args.chromium, work / "screenshots"))
        prompts = {}
        for path in workflows:
            ui = json.loads(path.read_text())
            prompt = convert.ui_to_api(ui, object_info)
            lossless_widgets(ui, prompt)
            quick_sets = _set_input(prompt, *LOSSLESS)
            quick_sets += [s for cls, values in (QUICK.items() if args.quick else ())
                           for name, value in values.items() for s in _set_input(prompt, cls, name, value)]
            prompts[path] = (ui, prompt, quick_sets)
            row = Row(path.stem)
            if canvas is not None:
                await run_in_canvas(canvas, ui, prompt, row, args.timeout)
            else:
                await run_prompt(server, prompt, ui, row, args.timeout)
            if args.compare:
                compare_with_headless(args.python, path, row, work, quick_sets)
            rows.append(row)
            print(format_row(row), flush=True)
        if workflows:
            # The README's demo (or the last workflow run) for the cache and Cancel checks.
            first = workflows[-1]
            ui, prompt, quick_sets = prompts[first]
            cached = Row(f"{first.stem} again (cache)")
            before = set(server.output_dir.rglob("*"))
            await run_prompt(server, prompt, ui, cached, args.timeout)
            written = sorted(str(p) for p in set(server.output_dir.rglob("*")) - before)
            cached.files = written  # the preview still names the earlier file: ComfyUI replays the cached ui
            if cached.status == "ok" and (written or cached.cached_nodes != len(prompt)):
                cached.status = "error"
            cached.message = f"{cached.cached_nodes} of {len(prompt)} nodes cached, {len(written)} new files"
            rows.append(cached)
            print(format_row(cached), flush=True)

            changed = json.loads(json.dumps(prompt))
            sets = _set_input(changed, "VE_CrossFrameSampler", "seed", 1234)
            cancelled = Row(f"{first.stem} seed 1234, Cancel")
            await run_prompt(server, changed, ui, cancelled, args.timeout, cancel_at_progress=2)
            if cancelled.status == "interrupted":
                cancelled.status = "ok"
            else:
                cancelled.message = f"expected an interrupt, got {cancelled.status}: {cancelled.message}"
                cancelled.status = "error"
            rows.append(cancelled)
            print(format_row(cancelled), flush=True)
            rerun = Row(f"{first.stem} seed 1234, after Cancel")
            await run_prompt(server, changed, ui, rerun, args.timeout)
            if args.compare:
                compare_with_headless(args.python, first, rerun, work, quick_sets + sets)
            rows.append(rerun)
            print(format_row(rerun), flush=True)
    finally:
        await stack.aclose()
        server.stop()
        if link is not None:
            link.unlink()
        if rows and not all(r.passed for r in rows):
            print(f"--- last lines of the ComfyUI log ({server.log_path}) ---\n{server.log_tail()}")
        elif not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def format_row(row: Row) -> str:
    preview = f"{row.preview.get('key')}:{row.preview.get('filename')}" if row.preview else "-"
    files = ", ".join(os.path.basename(f) for f in row.files) or "-"
    return (f"| {row.name} | {row.status} | {row.seconds:.1f} | {row.progress_events} | {files} | {preview} | "
            f"{row.same_as_headless} | {row.message} |")


def comfyui_commit(comfyui: str) -> str:
    version_file = Path(comfyui) / "comfyui_version.py"
    version = re.search(r'"([^"]+)"', version_file.read_text()).group(1) if version_file.exists() else "?"
    done = subprocess.run(["git", "-C", comfyui, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"ComfyUI {version}" + (f" ({done.stdout.strip()})" if done.returncode == 0 else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comfyui", help="path of a ComfyUI checkout (the folder with main.py)")
    parser.add_argument("--python", default=sys.executable,
                        help="Python with ComfyUI's and this pack's requirements (default: this one)")
    parser.add_argument("--workflow", action="append", help="only this workflow (file name without .json); repeatable")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one workflow may take")
    parser.add_argument("--start-timeout", type=float, default=180, help="seconds ComfyUI may take to start")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the comparison of each output with a headless run")
    parser.add_argument("--quick", action="store_true",
                        help="6 frames and 6 steps per workflow (see QUICK); not with --canvas, which runs the files as saved")
    parser.add_argument("--canvas", action="store_true",
                        help="load, convert and queue each workflow in ComfyUI's own frontend in headless Chromium "
                             "(needs `pip install playwright` and a Chromium; screenshots land in the kept folder)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium",
                        help="the Chromium executable for --canvas")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (outputs, ComfyUI's log)")
    args = parser.parse_args(argv)
    if args.canvas and args.quick:
        parser.error("--canvas runs the workflows as saved; leave out --quick")
    # A `timeout` or a kill sends SIGTERM, which would end Python without running the cleanup: the server would
    # go on running and the link would stay in custom_nodes/. As SystemExit it unwinds through every `finally`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rows = asyncio.run(check(args))
    print(f"\n{comfyui_commit(args.comfyui)}, pack at {PACK_DIR.name}")
    print("| check | status | s | progress events | output | ui preview | same as headless | message |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(format_row(row))
    passed = sum(r.passed for r in rows)
    print(f"\n{passed} passed, {len(rows) - passed} failed")
    return 0 if rows and passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
