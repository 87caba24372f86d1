"""Digests of every shipped workflow's outputs on builtin:tiny, to show a refactor changes no pixel.

    python scripts/workflow_digests.py --save before.json     # on the old tree
    python scripts/workflow_digests.py --check before.json    # on the new tree: exit 1 on any difference

Each workflow runs headless as shipped (full settings) in this process; every tensor a node returns
(IMAGE frames, LATENT samples, MASK) is hashed by its exact bytes (sha256 of dtype, shape and data).
Outputs are keyed by workflow, node id and output slot; node ids are stable across a migration that
replaces a node in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def digests_of(value, prefix: str, out: dict) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = tensor_digest(value)
    elif isinstance(value, dict):
        for key in sorted(value):
            if isinstance(value[key], torch.Tensor):
                out[f"{prefix}.{key}"] = tensor_digest(value[key])


def workflow_digests(names: list[str] | None = None, each=None) -> dict:
    """{workflow stem: {"node:slot[.key]": digest}}; `each(stem, found)` is called as each workflow finishes."""
    from comfyui_video_edit.headless import execute, object_info, ui_to_api
    from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_bridge

    info = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
    result = {}
    for path in sorted((ROOT / "workflows").glob("*.json")):
        if names and path.stem not in names:
            continue
        with tempfile.TemporaryDirectory() as folder, comfy_bridge.writing_to(folder):
            run = execute(ui_to_api(json.loads(path.read_text()), info), NODE_CLASS_MAPPINGS)
        found: dict = {}
        for node_id, values in run.outputs.items():
            for slot, value in enumerate(values):
                digests_of(value, f"{node_id}:{slot}", found)
        result[path.stem] = found
        if each is not None:
            each(path.stem, found)
    return result


def compare(stem: str, found: dict, before: dict) -> int:
    """Print one line for a workflow; the number of tensors that changed or went missing."""
    old = before.get(stem)
    if old is None:
        print(f"{stem}: not in the saved digests", flush=True)
        return 0
    same = [k for k in old if found.get(k) == old[k]]
    changed = [k for k in old if k in found and found[k] != old[k]]
    missing = [k for k in old if k not in found]
    print(f"{stem}: {len(same)}/{len(old)} identical" + (f"; changed {changed}" if changed else "")
          + (f"; missing {missing}" if missing else ""), flush=True)
    return len(changed) + len(missing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", metavar="JSON")
    group.add_argument("--check", metavar="JSON")
    parser.add_argument("--workflow", action="append", help="only this workflow (stem); repeatable")
    args = parser.parse_args(argv)
    if args.save:
        now = workflow_digests(args.workflow, lambda stem, found: print(f"{stem}: {len(found)} tensors", flush=True))
        Path(args.save).write_text(json.dumps(now, indent=1, sort_keys=True))
        return 0
    before = json.loads(Path(args.check).read_text())
    differ = []
    workflow_digests(args.workflow, lambda stem, found: differ.append(compare(stem, found, before)))
    return 1 if any(differ) else 0


if __name__ == "__main__":
    sys.exit(main())
