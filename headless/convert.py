"""UI workflow (what the canvas saves) -> API prompt (what `POST /prompt` takes).

Mirrors the ComfyUI frontend's `graphToPrompt`. The rules are written up, with test vectors made
by the real frontend, in `tests/fixtures/workflow_vectors/README.md`:
- `widgets_values` are positional over the object_info inputs (required, then optional) that get
  a widget; UI-only widgets (control after generate, combo filter, upload) take a slot but are
  never sent;
- links are resolved by link id through Reroutes, bypassed nodes and subgraphs; PrimitiveNodes
  push their value into the widgets they feed;
- muted and bypassed nodes are not emitted, and a last pass drops links to nodes not emitted;
- unlike the frontend, a link from a node that is not in the file at all is an error (the frontend drops it,
  and a sampler whose images input vanished samples from noise without a word).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .links import is_link

VIRTUAL_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})
MODE_MUTED, MODE_BYPASS = 2, 4
SUBGRAPH_INPUT_NODE, SUBGRAPH_OUTPUT_NODE = "-10", "-20"
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN"})
SEED_NAMES = frozenset({"seed", "noise_seed"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
TYPE_DEFAULTS = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}


class ConversionError(ValueError):
    """The file is not a workflow this converter can turn into an API prompt."""


# --- widgets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _InputSpec:
    name: str
    type: Any  # a type string, or a list of choices (V1 combo)
    options: dict
    required: bool


def _input_specs(info: dict) -> list[_InputSpec]:
    """Required then optional inputs, in `input_order` (or INPUT_TYPES key order)."""
    declared = info.get("input") or {}
    order = info.get("input_order") or {}
    specs = []
    for section in ("required", "optional"):
        section_specs = declared.get(section) or {}
        for name in order.get(section) or list(section_specs):
            spec = section_specs.get(name)
            if not spec:
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append(_InputSpec(name, spec[0], options, section == "required"))
    return specs


def _is_combo(input_type: Any) -> bool:
    return isinstance(input_type, (list, tuple)) or input_type == "COMBO"


def _takes_widget(spec: _InputSpec) -> bool:
    return _is_combo(spec.type) or (isinstance(spec.type, str) and spec.type in WIDGET_TYPES)


def _ui_only_widgets(spec: _InputSpec) -> int:
    """Widgets the frontend adds after this one: control (INT), control + filter (COMBO)."""
    flag = spec.options.get("control_after_generate")
    if spec.type == "INT":
        if flag is None:  # absent key: seeds get a control by name
            return 1 if spec.name in SEED_NAMES else 0
        return 1 if flag else 0
    if _is_combo(spec.type) and flag:
        return 2
    return 0


def _has_upload_widget(specs: list[_InputSpec]) -> bool:
    return any(
        s.required and _is_combo(s.type) and any(s.options.get(f) for f in UPLOAD_FLAGS) for s in specs
    )


def _widget_slots(specs: list[_InputSpec], keep_force_input: bool) -> list[_InputSpec | None]:
    """One entry per `widgets_values` slot: the input it holds, or None for a UI-only slot.

    `keep_force_input` gives the legacy layout in which forceInput inputs also held a slot.
    """
    slots: list[_InputSpec | None] = []
    for spec in specs:
        if not _takes_widget(spec):
            continue
        forced = bool(spec.options.get("forceInput"))
        if forced and not keep_force_input:
            continue
        slots.append(None if forced else spec)
        slots.extend([None] * _ui_only_widgets(spec))
    if _has_upload_widget(specs):
        slots.append(None)  # the upload button is the last widget
    return slots


def _default_value(spec: _InputSpec) -> Any:
    if "default" in spec.options:
        return spec.options["default"]
    if _is_combo(spec.type):
        choices = spec.type if isinstance(spec.type, (list, tuple)) else spec.options.get("options") or []
        return choices[0] if choices else None
    return TYPE_DEFAULTS.get(spec.type)


def _wrap(value: Any) -> Any:
    """A list constant would read as a link: the API wraps it."""
    return {"__value__": value} if isinstance(value, list) else value


def _legacy_fix(class_type: str, name: str, value: Any) -> Any:
    """Old KSampler files stored `sample_`-prefixed sampler names (the frontend fixes them on load)."""
    if class_type in ("KSampler", "KSamplerAdvanced") and name == "sampler_name":
        if isinstance(value, str) and value.startswith("sample_"):
            return value[len("sample_"):]
    return value


def widget_inputs(node: dict, info: dict) -> dict[str, Any]:
    """The API inputs a node's widgets give, in widget order (linked or not)."""
    specs = _input_specs(info)
    stored = node.get("widgets_values")
    if isinstance(stored, dict):  # some packs save widgets by name
        named = [s for s in _widget_slots(specs, keep_force_input=False) if s is not None]
        return {s.name: _wrap(stored.get(s.name, _default_value(s))) for s in named}

    stored = list(stored or [])
    slots = _widget_slots(specs, keep_force_input=False)
    if len(stored) != len(slots):
        legacy = _widget_slots(specs, keep_force_input=True)
        if len(stored) == len(legacy):
            slots = legacy
    values = {}
    for index, spec in enumerate(slots):
        if spec is None:
            continue
        value = stored[index] if index < len(stored) else _default_value(spec)
        values[spec.name] = _wrap(_legacy_fix(node.get("type", ""), spec.name, value))
    return values


# --- graph ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Link:
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: Any


@dataclass(frozen=True)
class _Origin:
    """A link resolved to a real node output."""

    node_id: str
    slot: int


@dataclass(frozen=True)
class _Constant:
    """A link resolved to a PrimitiveNode's value."""

    value: Any


@dataclass
class _Scope:
    """One graph level: the root graph, or one subgraph instance's inner graph."""

    prefix: str  # "" for the root, "5:" inside instance 5, "5:7:" nested
    nodes: dict[str, dict]
    links: dict[int, _Link]
    parent: _Scope | None = None
    instance: dict | None = None  # the subgraph instance node, in the parent scope


def _links_table(raw_links: list) -> dict[int, _Link]:
    """Links as `[id, origin, origin_slot, target, target_slot, type]` or as objects."""
    table = {}
    for raw in raw_links or []:
        if isinstance(raw, dict):
            link_id, origin, o_slot, target, t_slot, link_type = (
                raw.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
            )
        else:
            link_id, origin, o_slot, target, t_slot, link_type = (list(raw) + [None] * 6)[:6]
        if link_id is None:
            continue
        table[int(link_id)] = _Link(str(origin), int(o_slot or 0), str(target), int(t_slot or 0), link_type)
    return table


def _nodes_table(raw_nodes: list) -> dict[str, dict]:
    return {str(node["id"]): node for node in raw_nodes or [] if isinstance(node, dict) and "id" in node}


def _collect_subgraphs(container: dict, found: dict[str, dict]) -> dict[str, dict]:
    """Subgraph definitions by id, including ones nested inside other definitions."""
    for subgraph in (container.get("definitions") or {}).get("subgraphs") or []:
        found[str(subgraph.get("id"))] = subgraph
        _collect_subgraphs(subgraph, found)
    return found


def _id_sort_key(node_id: str) -> tuple:
    parts = node_id.split(":")
    return (len(parts), [(0, int(p), "") if p.lstrip("-").isdigit() else (1, 0, p) for p in parts])


def types_connect(a: Any, b: Any) -> bool:
    """LiteGraph's link-compatibility rule: '*'/'' match anything; comma lists overlap."""
    if a in (None, "", "*") or b in (None, "", "*") or a == b:
        return True
    a_types = {t.strip() for t in str(a).lower().split(",")}
    b_types = {t.strip() for t in str(b).lower().split(",")}
    return bool(a_types & b_types)


def _bypass_input_index(node: dict, slot: int, want_type: Any) -> int:
    """Which input a bypassed node passes through to output `slot` (-1: none)."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    if want_type in (None, "", "*"):
        if slot < len(inputs):
            return slot
        return 0 if inputs else -1
    output_type = outputs[slot].get("type") if slot < len(outputs) else None
    if slot < len(inputs):
        same_slot_type = inputs[slot].get("type")
        if types_connect(same_slot_type, output_type) and types_connect(same_slot_type, want_type):
            return slot
    for index, inp in enumerate(inputs):
        if inp.get("type") == want_type:
            return index
    for index, inp in enumerate(inputs):
        if types_connect(inp.get("type"), output_type) and types_connect(inp.get("type"), want_type):
            return index
    return -1


class _DanglingLink(Exception):
    """A link whose origin node is not in the file; reported for the input that uses it."""

    def __init__(self, origin_id: str):
        super().__init__(origin_id)
        self.origin_id = origin_id


class _Converter:
    def __init__(self, workflow: dict, object_info: dict):
        self.object_info = object_info
        self.subgraphs = _collect_subgraphs(workflow, {})
        self.root = _Scope("", _nodes_table(workflow.get("nodes")), _links_table(workflow.get("links")))
        self._children: dict[str, _Scope] = {}

    def convert(self) -> dict:
        prompt: dict[str, dict] = {}
        self._emit_scope(self.root, prompt)
        prompt = {key: prompt[key] for key in sorted(prompt, key=_id_sort_key)}
        _drop_links_to_missing(prompt)
        return prompt

    def _child_scope(self, scope: _Scope, instance: dict) -> _Scope:
        prefix = f"{scope.prefix}{instance['id']}:"
        if prefix not in self._children:
            definition = self.subgraphs[str(instance["type"])]
            self._children[prefix] = _Scope(
                prefix, _nodes_table(definition.get("nodes")), _links_table(definition.get("links")),
                parent=scope, instance=instance,
            )
        return self._children[prefix]

    def _emit_scope(self, scope: _Scope, prompt: dict) -> None:
        for node_id in sorted(scope.nodes, key=_id_sort_key):
            node = scope.nodes[node_id]
            node_type = node.get("type")
            if node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS) or node_type in VIRTUAL_TYPES:
                continue
            if str(node_type) in self.subgraphs:
                self._emit_scope(self._child_scope(scope, node), prompt)
                continue
            info = self.object_info.get(node_type)
            if info is None:
                raise ConversionError(
                    f"node {scope.prefix}{node_id} has type '{node_type}', which no loaded node pack "
                    "defines: install the pack that provides it, or delete or mute the node"
                )
            prompt[scope.prefix + node_id] = self._emit_node(scope, node, info)

    def _emit_node(self, scope: _Scope, node: dict, info: dict) -> dict:
        inputs = widget_inputs(node, info)
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            try:
                resolved = self._resolve_link(scope, inp["link"], inp.get("type"), set())
            except _DanglingLink as dangling:
                title = node.get("title") or info.get("display_name") or node.get("type")
                raise ConversionError(
                    f"node {scope.prefix}{node['id']} ({title}) input '{inp.get('name')}' is linked to node "
                    f"{dangling.origin_id}, which is not in the file: reconnect the input to an "
                    "existing node, or remove the link") from None
            if isinstance(resolved, _Constant):
                widget_name = (inp.get("widget") or {}).get("name") or inp.get("name")
                inputs[widget_name] = _wrap(resolved.value)
            elif isinstance(resolved, _Origin):
                inputs[inp.get("name")] = [resolved.node_id, resolved.slot]
        title = node.get("title") or info.get("display_name") or node.get("type")
        return {"inputs": inputs, "class_type": node.get("type"), "_meta": {"title": title}}

    def _resolve_link(self, scope: _Scope, link_id: int, want_type: Any, seen: set):
        """Follow one link back to a real output, a primitive's value, or nothing (None)."""
        key = (scope.prefix, int(link_id))
        if key in seen:
            raise ConversionError(
                f"link {link_id} loops back on itself through reroutes or bypassed nodes: break the loop"
            )
        seen.add(key)
        link = scope.links.get(int(link_id))
        if link is None:
            return None
        if link.origin_id == SUBGRAPH_INPUT_NODE and scope.instance is not None:
            outer_inputs = scope.instance.get("inputs") or []
            if link.origin_slot >= len(outer_inputs) or outer_inputs[link.origin_slot].get("link") is None:
                return None  # unconnected subgraph input: the inner widget keeps its value
            outer = outer_inputs[link.origin_slot]
            return self._resolve_link(scope.parent, outer["link"], outer.get("type"), seen)
        origin = scope.nodes.get(link.origin_id)
        if origin is None:
            # Muted/bypassed origins are in the file and handled above; an origin missing altogether (an edited
            # or damaged file) would silently drop the input, so it is refused (as the API form of it is).
            raise _DanglingLink(scope.prefix + link.origin_id)
        return self._resolve_output(scope, origin, link.origin_slot, want_type, seen)

    def _resolve_output(self, scope: _Scope, node: dict, slot: int, want_type: Any, seen: set):
        node_type = node.get("type")
        if node.get("mode", 0) == MODE_BYPASS:
            index = _bypass_input_index(node, slot, want_type)
            if index < 0:
                return None
            passed = node["inputs"][index]
            if passed.get("link") is None:
                return None
            return self._resolve_link(scope, passed["link"], passed.get("type"), seen)
        if str(node_type) in self.subgraphs:
            inner = self._child_scope(scope, node)
            for link_id, link in inner.links.items():
                if link.target_id == SUBGRAPH_OUTPUT_NODE and link.target_slot == slot:
                    return self._resolve_link(inner, link_id, want_type, seen)
            return None
        if node_type == "Reroute":
            inputs = node.get("inputs") or []
            if not inputs or inputs[0].get("link") is None:
                return None
            return self._resolve_link(scope, inputs[0]["link"], want_type, seen)
        if node_type == "PrimitiveNode":
            values = node.get("widgets_values")
            return _Constant(values[0]) if isinstance(values, list) and values else None
        if node_type in VIRTUAL_TYPES:
            return None
        return _Origin(scope.prefix + str(node["id"]), int(slot))


def _drop_links_to_missing(prompt: dict) -> None:
    """Links to nodes that were not emitted (muted ones) vanish, widget or not."""
    for entry in prompt.values():
        inputs = entry["inputs"]
        for name in [n for n, v in inputs.items() if is_link(v) and str(v[0]) not in prompt]:
            del inputs[name]


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI workflow (`ui.json` or exported flavour) into an API prompt."""
    if not isinstance(workflow.get("nodes"), list):
        raise ConversionError("not a UI workflow: it has no 'nodes' list")
    return _Converter(workflow, object_info).convert()


# --- files ---------------------------------------------------------------------------------


def _is_prompt_body(data: dict) -> bool:
    inner = data.get("prompt")
    return isinstance(inner, dict) and "class_type" not in inner


def _is_api_prompt(data: dict) -> bool:
    return bool(data) and all(isinstance(v, dict) and "class_type" in v for v in data.values())


def detect_format(data: Any) -> str:
    """'ui' for a canvas workflow, 'api' for an API prompt or a `/prompt` request body."""
    if isinstance(data, dict):
        if isinstance(data.get("nodes"), list):
            return "ui"
        if _is_prompt_body(data) or _is_api_prompt(data):
            return "api"
    raise ConversionError(
        "not a ComfyUI workflow: expected a UI workflow (with 'nodes' and 'links') or an API prompt "
        "(node ids mapping to {'class_type', 'inputs'})"
    )


def to_api_prompt(data: Any, object_info: dict | Callable[[], dict] | None = None) -> dict:
    """The API prompt in a parsed workflow file of any supported flavour.

    `object_info` may be a function, called only when a UI workflow needs it.
    """
    if detect_format(data) == "ui":
        if callable(object_info):
            object_info = object_info()
        if object_info is None:
            raise ConversionError(
                "this is a UI workflow: converting it needs the node definitions (object_info); "
                "pass them, or export the workflow in API format"
            )
        return ui_to_api(data, object_info)
    return data["prompt"] if _is_prompt_body(data) else data


def read_json(path: str | Path) -> Any:
    """A workflow file's parsed JSON, with a one-line error when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConversionError(f"cannot read workflow {path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConversionError(f"workflow {path} is not a JSON file{where}: save it again as JSON") from exc


def load_workflow(path: str | Path, object_info: dict | Callable[[], dict] | None = None) -> dict:
    """Read a UI workflow, an API prompt, or a `/prompt` body from a JSON file."""
    return to_api_prompt(read_json(path), object_info)
