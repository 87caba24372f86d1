"""ComfyUI's `/object_info` entries, built from V1 node classes without ComfyUI.

The field set and its conditional keys follow ComfyUI's server (`node_info`): `output_tooltips`
appears only when the class declares OUTPUT_TOOLTIPS, `deprecated`/`experimental` only when true.
Tuples become lists, as they would after a JSON round trip.
"""

from __future__ import annotations

from typing import Any


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, recursively, so the entry looks like parsed `/object_info` JSON."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def node_info(class_name: str, cls: type, display_name: str | None = None) -> dict:
    """The `/object_info[class_name]` entry of one node class."""
    get_v1_info = getattr(cls, "GET_NODE_INFO_V1", None)
    if callable(get_v1_info):  # a V3 (comfy_api) class describes itself
        return _jsonable(get_v1_info())

    input_types = cls.INPUT_TYPES()
    outputs = tuple(getattr(cls, "RETURN_TYPES", ()))
    info: dict[str, Any] = {
        "input": input_types,
        "input_order": {section: list(specs.keys()) for section, specs in input_types.items()},
        "output": outputs,
        "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(outputs)),
        "output_name": getattr(cls, "RETURN_NAMES", outputs),
        "name": class_name,
        "display_name": display_name if display_name is not None else class_name,
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = cls.OUTPUT_TOOLTIPS
    if getattr(cls, "DEPRECATED", False):
        info["deprecated"] = True
    if getattr(cls, "EXPERIMENTAL", False):
        info["experimental"] = True
    if hasattr(cls, "API_NODE"):
        info["api_node"] = cls.API_NODE
    return _jsonable(info)


def object_info(class_mappings: dict[str, type], display_names: dict[str, str]) -> dict:
    """The whole `/object_info` table for a node mapping."""
    return {name: node_info(name, cls, display_names.get(name)) for name, cls in class_mappings.items()}
