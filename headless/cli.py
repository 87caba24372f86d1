"""`video-edit`: run ComfyUI workflow files without ComfyUI.

    video-edit run WORKFLOW.json [--set ID.input=value ...] [--video PATH] [--prompt TEXT]
                                 [--seed N] [--output-dir DIR] [--debug]
    video-edit nodes

Exit codes: 0 done, 1 workflow / validation / execution error, 2 command-line usage error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from typing import Any

from .convert import ConversionError, detect_format, read_json, to_api_prompt
from .execute import NodeExecutionError, OverrideSyntaxError, RunResult, WorkflowError, apply_overrides, execute
from .object_info import object_info

DEFAULT_NODE_PACK = "comfyui_video_edit.nodes"
BRIDGE_MODULE = "comfyui_video_edit.nodes.comfy_bridge"

# Shortcut option -> the (node class, input) pairs it sets, on every node of that class.
SHORTCUTS: dict[str, list[tuple[str, str]]] = {
    "video": [("VE_LoadVideo", "video")],
    "prompt": [("VE_CrossFrameSampler", "prompt")],
    "seed": [("VE_CrossFrameSampler", "seed")],
}


class NodePackError(RuntimeError):
    """The node pack (or its output-folder bridge) cannot be imported."""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--nodes", default=DEFAULT_NODE_PACK, metavar="MODULE",
                        help="Python module exporting NODE_CLASS_MAPPINGS (default: this pack)")
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    parser = argparse.ArgumentParser(prog="video-edit", description="Run ComfyUI workflow files headless.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", parents=[common], help="run a workflow (UI or API JSON)")
    run.add_argument("workflow", help="workflow JSON: saved from the canvas, exported in API format, "
                                      "or a /prompt request body")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="ID.input=VALUE",
                     help="set one node input; VALUE is read as JSON when it parses, else as text "
                          "(repeatable; applied after the shortcuts)")
    run.add_argument("--video", help="input video for every Load Video node")
    run.add_argument("--prompt", help="prompt for every sampler node")
    run.add_argument("--seed", type=int, help="seed for every sampler node")
    run.add_argument("--output-dir", help="folder the output nodes write to")
    run.add_argument("--consistency", action="store_true",
                     help="print each output's temporal warp error under the source clip's optical flow")
    commands.add_parser("nodes", parents=[common], help="list the node types this runner knows")
    to_ui = commands.add_parser("to-ui", parents=[common],
                                help="turn an API-format workflow into a canvas (UI) workflow ComfyUI can load")
    to_ui.add_argument("workflow", help="API-format workflow JSON (or a /prompt body)")
    to_ui.add_argument("output", help="UI workflow file to write (never overwritten)")
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


def set_output_directory(path: str) -> None:
    try:
        bridge = importlib.import_module(BRIDGE_MODULE)
    except ImportError as exc:
        raise NodePackError(f"--output-dir needs {BRIDGE_MODULE}, which cannot be imported: {exc}") from exc
    os.makedirs(path, exist_ok=True)
    bridge.set_output_directory(path)


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
    mappings, display_names = load_node_pack(args.nodes)
    data = read_json(args.workflow)
    prompt = to_api_prompt(data, lambda: object_info(mappings, display_names))
    video = os.path.abspath(args.video) if args.video else None
    prompt = apply_shortcuts(prompt, {"video": video, "prompt": args.prompt, "seed": args.seed})
    prompt = apply_overrides(prompt, args.sets, mappings)
    if args.output_dir:
        set_output_directory(os.path.abspath(args.output_dir))
    extra_pnginfo = {"workflow": data} if detect_format(data) == "ui" else None
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
    from ..pipelines_core.flow import warp_error
    from ..pipelines_core.flow_estimate import estimate_flow

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


def nodes_command(args: argparse.Namespace) -> int:
    mappings, display_names = load_node_pack(args.nodes)
    for name in sorted(mappings):
        print(f"{name}\t{display_names.get(name, name)}")
    return 0


def _report(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = str(exc).strip() or type(exc).__name__
    print(f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its usage message
        return exit_.code if isinstance(exit_.code, int) else 2
    command = {"run": run_command, "to-ui": to_ui_command, "nodes": nodes_command}[args.command]
    try:
        return command(args)
    except OverrideSyntaxError as exc:
        _report(exc, args.debug)
        return 2
    except (ConversionError, WorkflowError, NodeExecutionError, NodePackError) as exc:
        _report(exc, args.debug)
        return 1
    except Exception as exc:  # a bug, not a workflow problem: still one line unless --debug
        if args.debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
