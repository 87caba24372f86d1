"""API prompt -> UI workflow (what the canvas loads), the inverse of `convert.ui_to_api`.

Like the frontend's "load API JSON", it lays the nodes out left to right by dependency depth, lists
socket inputs first and then one input per widget, and fills `widgets_values` positionally with the
UI-only slots (control after generate, combo filter, upload button) the frontend expects.
"""

from __future__ import annotations

import uuid
from typing import Any

from .links import is_link
from .convert import _has_upload_widget, _input_specs, _is_combo, _takes_widget, _ui_only_widgets

COLUMN_WIDTH, ROW_HEIGHT = 380, 420
UI_ONLY_FILLERS = ("fixed", "")  # control-after-generate value, then the combo filter


def _depths(prompt: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def walk(node_id: str) -> int:
        if node_id not in depth:
            parents = [v[0] for v in prompt[node_id]["inputs"].values() if is_link(v) and v[0] in prompt]
            depth[node_id] = 1 + max((walk(p) for p in parents), default=-1)
        return depth[node_id]

    for node_id in prompt:
        walk(node_id)
    return depth


def _is_socket_only(spec) -> bool:
    """A widget-typed input declared `forceInput`: the canvas shows a socket and stores no widget value, so a
    constant given to it in API form has no place in a UI file (connect a primitive node to set it there)."""
    return bool(spec.options.get("forceInput"))


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    """A UI-format workflow (schema version 0.4) holding the same graph as the API `prompt`."""
    ids = {node_id: i + 1 for i, node_id in enumerate(sorted(prompt, key=lambda k: (len(k), k)))}
    depth = _depths(prompt)
    rows: dict[int, int] = {}
    nodes, links = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}

    for node_id in sorted(prompt, key=lambda k: ids[k]):
        entry = prompt[node_id]
        info = object_info[entry["class_type"]]
        specs = _input_specs(info)
        inputs, values = [], []
        for spec in specs:  # sockets first, as the canvas lists them
            if not _takes_widget(spec) and spec.name in entry["inputs"]:
                inputs.append({"name": spec.name, "type": spec.type, "link": None})
            elif _is_socket_only(spec) and is_link(entry["inputs"].get(spec.name)):
                inputs.append({"name": spec.name, "type": spec.type, "link": None})
        for spec in specs:
            if not _takes_widget(spec) or _is_socket_only(spec):  # a forceInput widget type has no widget slot
                continue
            value = entry["inputs"].get(spec.name, spec.options.get("default"))
            linked = is_link(value)
            inputs.append({"name": spec.name, "type": "COMBO" if _is_combo(spec.type) else spec.type,
                           "widget": {"name": spec.name}, "link": None})
            values.append(spec.options.get("default") if linked else value)
            values.extend(UI_ONLY_FILLERS[:_ui_only_widgets(spec)])
        if _has_upload_widget(specs):
            values.append("video" if any(s.options.get("video_upload") for s in specs) else "image")
        for slot, item in enumerate(inputs):
            value = entry["inputs"].get(item["name"])
            if is_link(value):
                link_id = len(links) + 1
                origin, origin_slot = value
                links.append([link_id, ids[origin], origin_slot, ids[node_id], slot,
                              object_info[prompt[origin]["class_type"]]["output"][origin_slot]])
                item["link"] = link_id
                outgoing.setdefault((origin, origin_slot), []).append(link_id)
        column = depth[node_id]
        row = rows[column] = rows.get(column, -1) + 1
        node = {
            "id": ids[node_id], "type": entry["class_type"], "pos": [40 + column * COLUMN_WIDTH, 40 + row * ROW_HEIGHT],
            "size": [340, 120 + 26 * len(values)], "flags": {}, "order": 0, "mode": 0, "inputs": inputs,
            "outputs": [], "properties": {"Node name for S&R": entry["class_type"]}, "widgets_values": values,
        }
        title = entry.get("_meta", {}).get("title")
        if title and title != info.get("display_name"):
            node["title"] = title
        node["_outputs"] = (info["output"], info.get("output_name") or info["output"])
        nodes.append(node)

    by_id = {n["id"]: k for k, n in zip(sorted(prompt, key=lambda k: ids[k]), nodes)}
    for order, node in enumerate(sorted(nodes, key=lambda n: (depth[by_id[n["id"]]], n["id"]))):
        node["order"] = order
    for node in nodes:
        types, names = node.pop("_outputs")
        node["outputs"] = [
            {"name": name, "type": t, "links": outgoing.get((by_id[node["id"]], slot), []), "slot_index": slot}
            for slot, (t, name) in enumerate(zip(types, names))
        ]
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, repr(sorted(prompt)))),
        "revision": 0, "last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
        "groups": [], "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4,
    }
