"""`video-edit`: run ComfyUI workflow files without ComfyUI.

    video-edit run WORKFLOW.json [--set ID.input=value ...] [--video PATH] [--prompt TEXT]
                                 [--seed N] [--output-dir DIR] [--debug]
    video-edit nodes [--methods]

Exit codes (also in `video-edit --help`): see EXIT_CODES.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import traceback
from typing import Any, Optional

from . import batch  # `video-edit batch` (Ray); batch.py imports this module too, by module
from .convert import ConversionError, detect_format, read_json, to_api_prompt
from .execute import NodeExecutionError, OverrideSyntaxError, RunResult, WorkflowError, apply_overrides, execute
from .object_info import object_info

DEFAULT_NODE_PACK = "comfyui_video_edit.nodes"
BRIDGE_MODULE = "comfyui_video_edit.nodes.comfy_bridge"
METHODS_MODULE = "comfyui_video_edit.nodes.methods"  # the method-node registry: renders its Markdown table

# Shortcut option -> the (node class, input) pairs it sets, on every node of that class.
SHORTCUTS: dict[str, list[tuple[str, str]]] = {
    "video": [("VE_LoadVideo", "video"), ("VE_LoadVideoLatents", "video")],
    "prompt": [("VE_CrossFrameSampler", "prompt")],
    # the loader's seed draws the VAE posterior the sampler would draw: both follow --seed
    "seed": [("VE_CrossFrameSampler", "seed"), ("VE_LoadVideoLatents", "seed")],
}


# Kept as they were before 130 was added (scripts test them): a workflow that cannot run is 1, like one that
# fails while running, because both are "this workflow, as given, did not produce its outputs".
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = f"""exit codes:
  {EXIT_OK}    done: every output was written
  {EXIT_FAILED}    the workflow cannot run (a node, input or link is invalid: checked before anything runs) or a
       node failed while running
  {EXIT_USAGE}    command-line usage error: unknown option, bad --set syntax, unusable --output-dir
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C): nothing half-written is left under an output's name"""


class NodePackError(RuntimeError):
    """The node pack (or its output-folder bridge) cannot be imported."""


class OutputDirError(ValueError):
    """--output-dir names a folder that cannot be created or written."""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--nodes", default=DEFAULT_NODE_PACK, metavar="MODULE",
                        help="Python module exporting NODE_CLASS_MAPPINGS (default: this pack)")
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    parser = argparse.ArgumentParser(prog="video-edit", description="Run ComfyUI workflow files headless.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", parents=[common], help="run a workflow (UI or API JSON)",
                              epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("workflow", help="workflow JSON: saved from the canvas, exported in API format, "
                                      "or a /prompt request body")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="ID.input=VALUE",
                     help="set one node input; VALUE is read as JSON when it parses, else as text "
                          "(repeatable; applied after the shortcuts)")
    run.add_argument("--video", help="input video for every Load Video node")
    run.add_argument("--prompt", help="prompt for every sampler node")
    run.add_argument("--seed", type=int, help="seed for every sampler node")
    run.add_argument("--output-dir", help="folder the output nodes write to (created if needed; checked for "
                                          "writing before anything runs)")
    run.add_argument("--consistency", action="store_true",
                     help="print each output's temporal warp error under the source clip's optical flow")
    nodes = commands.add_parser("nodes", parents=[common], help="list the node types this runner knows")
    nodes.add_argument("--methods", action="store_true",
                       help="print the method nodes (one per paper) as the README's Markdown table")
    to_ui = commands.add_parser("to-ui", parents=[common],
                                help="turn an API-format workflow into a canvas (UI) workflow ComfyUI can load")
    to_ui.add_argument("workflow", help="API-format workflow JSON (or a /prompt body)")
    to_ui.add_argument("output", help="UI workflow file to write (never overwritten)")
    batch.add_batch_parser(commands, common)
    return parser


def load_node_pack(module_name: str) -> tuple[dict, dict]:
    """NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS of a node pack module."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NodePackError(f"cannot import the node pack '{module_name}': {exc}") from exc
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if not isinstance(mappings, dict):
        raise NodePackError(f"'{module_name}' has no NODE_CLASS_MAPPINGS: pass a node pack module to --nodes")
    return mappings, dict(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}) or {})


def apply_shortcuts(prompt: dict, values: dict[str, Any]) -> dict:
    """A copy of `prompt` with each given shortcut set on every node of its classes."""
    updated = {node_id: {**entry, "inputs": dict(entry.get("inputs") or {})} for node_id, entry in prompt.items()}
    for option, value in values.items():
        if value is None:
            continue
        targets = SHORTCUTS[option]
        hits = [(node_id, name) for node_id, entry in updated.items()
                for class_type, name in targets if entry.get("class_type") == class_type]
        if not hits:
            classes = ", ".join(sorted({c for c, _ in targets}))
            raise WorkflowError(f"--{option.replace('_', '-')} sets {classes} nodes, and this workflow has none: "
                                "use --set NODE_ID.input=value instead")
        for node_id, name in hits:
            updated[node_id]["inputs"][name] = value
    return updated


def check_output_directory(path: str) -> None:
    """Create `path` if needed and write a probe file in it: found before the pack loads, not after sampling.

    The file system is asked directly (permission bits mean nothing for root, a read-only mount or a full
    disk). Written here rather than borrowed from the pack: the runner works over any node pack.
    """
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".video_edit_probe_{os.getpid()}")
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError) as exc:
        raise OutputDirError(f"--output-dir {path}: a file is in the way of the folder ({exc.filename or path}): "
                             "choose another folder, or move the file") from exc
    except OSError as exc:
        raise OutputDirError(f"--output-dir {path}: cannot write there ({exc.strerror or type(exc).__name__}): "
                             "choose a folder you can write to") from exc


def writing_to(path: Optional[str]):
    """Output nodes of the run inside the block write to `path` (the node pack's bridge knows how); None: where
    the pack writes by default."""
    if path is None:
        return contextlib.nullcontext()
    try:
        bridge = importlib.import_module(BRIDGE_MODULE)
    except ImportError as exc:
        raise NodePackError(f"--output-dir needs {BRIDGE_MODULE}, which cannot be imported: {exc}") from exc
    os.makedirs(path, exist_ok=True)
    return bridge.writing_to(path)


def written_files(result: RunResult) -> list[str]:
    """Paths of the files output nodes wrote: their result's first item, else the ui entries."""
    files: list[str] = []
    for node_id in result.order:
        ui = result.ui.get(node_id) or {}
        entries = [item for value in ui.values() if isinstance(value, (list, tuple))
                   for item in value if isinstance(item, dict) and "filename" in item]
        if not entries:
            continue
        first = (result.outputs.get(node_id) or (None,))[0]
        if isinstance(first, str):
            files.append(first)
        elif isinstance(first, (list, tuple)) and first and all(isinstance(p, str) for p in first):
            files.extend(first)
        else:
            files.extend(os.path.join(e.get("subfolder") or "", e["filename"]) for e in entries)
    return files


def run_command(args: argparse.Namespace) -> int:
    if args.output_dir:
        check_output_directory(os.path.abspath(args.output_dir))
    mappings, display_names = load_node_pack(args.nodes)
    data = read_json(args.workflow)
    prompt = to_api_prompt(data, lambda: object_info(mappings, display_names))
    video = os.path.abspath(args.video) if args.video else None
    prompt = apply_shortcuts(prompt, {"video": video, "prompt": args.prompt, "seed": args.seed})
    prompt = apply_overrides(prompt, args.sets, mappings)
    extra_pnginfo = {"workflow": data} if detect_format(data) == "ui" else None
    with writing_to(os.path.abspath(args.output_dir) if args.output_dir else None):
        result = execute(prompt, mappings, extra_pnginfo=extra_pnginfo)
    for path in written_files(result):
        print(path)
    if args.consistency:
        for line in consistency_report(prompt, result):
            print(line)
    return 0


SOURCE_NODES = {"VE_LoadVideo": 0}  # class -> output slot holding the source frames


def consistency_report(prompt: dict, result: RunResult) -> list[str]:
    """Warp error (lower = steadier) of every output node's frames, against the source clip's DIS flow."""
    from ..pipelines_core.flow.warp import warp_error
    from ..pipelines_core.flow.estimate import estimate_flow

    sources = [result.outputs[k][slot] for k, v in prompt.items()
               if (slot := SOURCE_NODES.get(v["class_type"])) is not None and k in result.outputs]
    if len(sources) != 1:
        return [f"consistency: skipped (needs exactly one Load Video node, found {len(sources)})"]
    source = sources[0]
    flow = estimate_flow(source)
    lines = [f"consistency: source clip warp error {warp_error(source, flow):.5f}"]
    for node_id in result.ui:
        link = prompt[node_id]["inputs"].get("frames")
        if not (isinstance(link, list) and link[0] in result.outputs):
            continue
        frames = result.outputs[link[0]][link[1]]
        if frames.shape != source.shape:
            lines.append(f"consistency: node {node_id} skipped (its frames differ in count or size from the source)")
            continue
        lines.append(f"consistency: node {node_id} warp error {warp_error(frames, flow):.5f}")
    return lines


def to_ui_command(args: argparse.Namespace) -> int:
    from .api_to_ui import api_to_ui

    mappings, display_names = load_node_pack(args.nodes)
    data = read_json(args.workflow)
    if detect_format(data) == "ui":
        raise WorkflowError(f"{args.workflow} is already a UI workflow")
    ui = api_to_ui(to_api_prompt(data), object_info(mappings, display_names))
    try:
        with open(args.output, "x", encoding="utf-8") as f:
            json.dump(ui, f, indent=2)
    except FileExistsError:
        raise WorkflowError(f"{args.output} exists; choose another output file") from None
    print(args.output)
    return 0


def node_listing(mappings: dict, display_names: dict, methods: tuple = ()) -> list[str]:
    """`NAME<tab>DISPLAY NAME` per node, sorted; then a pack's method nodes (with their paper) and its deprecated
    nodes, each group after an empty line and a `#` line (a pack with neither gives one line per node, no more)."""
    method_ids = {m.node_id for m in methods}
    deprecated = sorted(n for n, cls in mappings.items() if getattr(cls, "DEPRECATED", False) and n not in method_ids)
    lines = [f"{n}\t{display_names.get(n, n)}" for n in sorted(mappings) if n not in method_ids | set(deprecated)]
    if methods:
        lines += ["", "# methods: one node per paper (`video-edit nodes --methods` prints them as a Markdown table)"]
        lines += [f"{m.node_id}\t{display_names.get(m.node_id, m.display_name)}\t{m.paper.cite()}"
                  for m in methods if m.node_id in mappings]
    if deprecated:
        lines += ["", "# deprecated: kept so that old workflows load (ComfyUI hides them from its node search)"]
        lines += [f"{n}\t{display_names.get(n, n)}" for n in deprecated]
    return lines


def nodes_command(args: argparse.Namespace) -> int:
    mappings, display_names = load_node_pack(args.nodes)
    methods = tuple(getattr(importlib.import_module(args.nodes), "METHODS", None) or ())
    if args.methods:
        if not methods:
            raise NodePackError(f"'{args.nodes}' declares no METHODS: it has no method nodes to list")
        print(importlib.import_module(METHODS_MODULE).markdown_table(methods))
        return 0
    for line in node_listing(mappings, display_names, methods):
        print(line)
    return 0


def _report(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = str(exc).strip() or type(exc).__name__
    print(f"error: {message}", file=sys.stderr)


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


class _BesideProgressBars(logging.StreamHandler):
    """Writes each record on a line of its own: a progress bar (tqdm) on the line is cleared first, redrawn after."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
        except ImportError:  # no bars to step around
            super().emit(record)
            return
        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


def _warning_handler() -> logging.Handler | None:
    """A handler printing warnings ("warning: ...", one line) while a command runs; None if one exists already.

    Nodes report what they recover from (a truncated video, a prompt cut at 77 tokens) with `logging`, which
    ComfyUI shows in its console; headless, Python would print them bare, or not at all once logging is set up.
    """
    root = logging.getLogger()
    if any(isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.__stderr__)
           for h in root.handlers):
        return None
    handler = _BesideProgressBars(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_OneLine())
    root.addHandler(handler)
    return handler


def _end_process(code: int) -> None:
    """Exit now, skipping the interpreter's teardown of torch & co. (seconds) after an interrupt.

    Cleanups already ran while the interrupt unwound (partial outputs removed); atexit callbacks (temporary
    folders' finalizers) run here; then only freeing memory is skipped, which the OS does anyway.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not turn into a traceback now
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """The `video-edit` command; `argv` None means the process's own command line (it may then end the process)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its usage message
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    command = {"run": run_command, "to-ui": to_ui_command, "nodes": nodes_command,
               "batch": batch.batch_command}[args.command]
    handler = _warning_handler()
    try:
        return command(args)
    except KeyboardInterrupt as exc:
        if args.debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print("\ninterrupted", file=sys.stderr)  # after a newline: a progress bar may hold the line
        if argv is None:
            _end_process(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except (OverrideSyntaxError, OutputDirError) as exc:
        _report(exc, args.debug)
        return EXIT_USAGE
    except (ConversionError, WorkflowError, NodeExecutionError, NodePackError) as exc:
        _report(exc, args.debug)
        return EXIT_FAILED
    except Exception as exc:  # a bug, not a workflow problem: still one line unless --debug
        if args.debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
