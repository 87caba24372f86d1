"""UI -> API conversion against vectors made by ComfyUI's own frontend, plus object_info."""

import copy
import json
from pathlib import Path

import pytest

from comfyui_video_edit.headless.convert import (
    ConversionError, detect_format, load_workflow, ui_to_api, widget_inputs,
)
from comfyui_video_edit.headless.object_info import node_info, object_info

VECTORS = Path(__file__).parent / "fixtures" / "workflow_vectors"
CASES = [case["name"] for case in json.loads((VECTORS / "cases.json").read_text())["cases"]]


def read(case: str, name: str) -> dict:
    return json.loads((VECTORS / case / name).read_text())


def canonical(value):
    """JSON numbers compare numerically (JS writes 1.0 as 1); booleans stay apart from numbers."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    return value


def declared_inputs(info: dict, class_type: str) -> set:
    order = info[class_type]["input_order"]
    return set(order.get("required", [])) | set(order.get("optional", []))


def comparable(prompt: dict, info: dict) -> dict:
    """Drop inputs object_info does not declare (PreviewAny's frontend-only `preview`) and
    `_meta` titles the converter cannot know (display_name null: the frontend's own name table)."""
    out = {}
    for node_id, entry in prompt.items():
        class_type = entry["class_type"]
        keep = declared_inputs(info, class_type)
        item = {"class_type": class_type,
                "inputs": canonical({k: v for k, v in entry["inputs"].items() if k in keep})}
        if info[class_type].get("display_name") is not None:
            item["title"] = entry["_meta"]["title"]
        out[node_id] = item
    return out


@pytest.mark.parametrize("flavour", ["ui.json", "ui_export.json"])
@pytest.mark.parametrize("case", CASES)
def test_vector_converts_to_frontend_api(case, flavour):
    info = read(case, "object_info.json")
    expected = read(case, "api.json")
    got = ui_to_api(read(case, flavour), info)
    assert comparable(got, info) == comparable(expected, info)


def test_vectors_cover_every_case_folder():
    folders = {p.name for p in VECTORS.iterdir() if p.is_dir()}
    assert folders == set(CASES)


def test_schema1_link_objects_convert_like_arrays():
    workflow = read("converted_widget", "ui.json")
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    as_objects = copy.deepcopy(workflow)
    as_objects["links"] = [dict(zip(keys, link)) for link in workflow["links"]]
    info = read("converted_widget", "object_info.json")
    assert ui_to_api(as_objects, info) == ui_to_api(workflow, info)


def test_links_are_resolved_by_id_not_target_slot():
    # Scrambling target_slot must not matter: the consumer's input names the link.
    workflow = read("converted_widget", "ui_export.json")
    info = read("converted_widget", "object_info.json")
    scrambled = copy.deepcopy(workflow)
    for link in scrambled["links"]:
        link[4] = 99
    assert ui_to_api(scrambled, info) == ui_to_api(workflow, info)


def test_unknown_node_type_names_node_and_type():
    workflow = read("plain", "ui.json")
    info = read("plain", "object_info.json")
    del info["DemoSlowStep"]
    node_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "DemoSlowStep")
    with pytest.raises(ConversionError, match=rf"node {node_id} has type 'DemoSlowStep'"):
        ui_to_api(workflow, info)


def test_unknown_type_is_fine_when_muted():
    workflow = read("plain", "ui.json")
    info = read("plain", "object_info.json")
    del info["DemoSlowStep"]
    for node in workflow["nodes"]:
        if node["type"] == "DemoSlowStep":
            node["mode"] = 2
    prompt = ui_to_api(workflow, info)
    assert all(entry["class_type"] != "DemoSlowStep" for entry in prompt.values())


def test_legacy_boolean_control_value_takes_its_slot():
    workflow = read("default_workflow", "ui.json")
    info = read("default_workflow", "object_info.json")
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    sampler["widgets_values"][1] = True  # what old files (and the built-in default graph) store
    sampler["widgets_values"][4] = "sample_euler"  # legacy sampler name
    inputs = ui_to_api(workflow, info)[str(sampler["id"])]["inputs"]
    assert inputs["steps"] == sampler["widgets_values"][2]
    assert inputs["cfg"] == sampler["widgets_values"][3]
    assert inputs["sampler_name"] == "euler"


# --- widget slots on hand-made specs -------------------------------------------------------


def info_for(required: dict, optional: dict | None = None, display_name="Thing") -> dict:
    inputs = {"required": required, **({"optional": optional} if optional else {})}
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}, "display_name": display_name}


def test_list_widget_value_is_wrapped():
    info = info_for({"points": ["STRING", {}]})
    assert widget_inputs({"type": "T", "widgets_values": [[1, 2]]}, info) == {"points": {"__value__": [1, 2]}}


def test_control_slots_follow_spec_flags():
    info = info_for({
        "seed": ["INT", {}],                                       # control by name
        "count": ["INT", {"control_after_generate": True}],        # control by flag
        "noise_seed": ["INT", {"control_after_generate": False}],  # explicitly none
        "pick": [["a", "b"], {"control_after_generate": True}],    # control + filter
        "last": ["FLOAT", {}],
    })
    values = [5, "fixed", 6, "increment", 7, "b", "randomize", "", 0.5]
    assert widget_inputs({"widgets_values": values}, info) == {
        "seed": 5, "count": 6, "noise_seed": 7, "pick": "b", "last": 0.5}


def test_upload_widget_is_last_and_not_sent():
    info = info_for({"video": [["a.mp4"], {"video_upload": True}], "frames": ["INT", {}]})
    assert widget_inputs({"widgets_values": ["a.mp4", 16, "video"]}, info) == {"video": "a.mp4", "frames": 16}


def test_legacy_force_input_slot_is_dropped():
    info = info_for({"a": ["INT", {}], "b": ["INT", {"forceInput": True}], "c": ["STRING", {}]})
    assert widget_inputs({"widgets_values": [1, 99, "x"]}, info) == {"a": 1, "c": "x"}
    assert widget_inputs({"widgets_values": [1, "x"]}, info) == {"a": 1, "c": "x"}


def test_short_widgets_values_take_spec_defaults():
    info = info_for({"a": ["INT", {"default": 3}], "b": [["x", "y"]]}, {"c": ["BOOLEAN", {"default": True}]})
    assert widget_inputs({"widgets_values": [1]}, info) == {"a": 1, "b": "x", "c": True}


def test_dict_widgets_values_are_read_by_name():
    info = info_for({"a": ["INT", {}], "b": ["STRING", {}]})
    assert widget_inputs({"widgets_values": {"b": "hi", "a": 4, "extra": 1}}, info) == {"a": 4, "b": "hi"}


# --- formats and files ---------------------------------------------------------------------


def test_detect_format():
    assert detect_format(read("plain", "ui.json")) == "ui"
    assert detect_format(read("plain", "api.json")) == "api"
    assert detect_format({"prompt": read("plain", "api.json"), "client_id": "x"}) == "api"
    with pytest.raises(ConversionError, match="not a ComfyUI workflow"):
        detect_format({"hello": 1})


def test_load_workflow_accepts_ui_api_and_prompt_body(tmp_path):
    info = read("reroute", "object_info.json")
    api = read("reroute", "api.json")
    files = {"ui.json": read("reroute", "ui.json"), "api.json": api, "body.json": {"prompt": api}}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    assert comparable(load_workflow(tmp_path / "ui.json", info), info) == comparable(api, info)
    assert load_workflow(tmp_path / "api.json") == api
    assert load_workflow(tmp_path / "body.json") == api
    with pytest.raises(ConversionError, match="UI workflow"):
        load_workflow(tmp_path / "ui.json")


def test_load_workflow_errors_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConversionError, match="not a JSON file") as bad:
        load_workflow(tmp_path / "bad.json")
    with pytest.raises(ConversionError, match="cannot read workflow") as missing:
        load_workflow(tmp_path / "missing.json")
    assert "\n" not in str(bad.value) and "\n" not in str(missing.value)


# --- object_info ---------------------------------------------------------------------------


class Blur:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"image": ("IMAGE",), "radius": ("INT", {"default": 2, "min": 0}),
                         "mode": (["box", "gauss"],)},
            "optional": {"mask": ("MASK",)},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "blur"
    CATEGORY = "test/image"


class Flagged(Blur):
    RETURN_NAMES = ("blurred", "mask")
    OUTPUT_TOOLTIPS = ("the image", "the mask")
    DESCRIPTION = "blurs"
    OUTPUT_NODE = True
    DEPRECATED = True
    EXPERIMENTAL = True


def test_node_info_has_comfyui_v1_field_set():
    reference = read("seed_control", "object_info.json")["DemoRandomImage"]  # a V1 class on a real server
    info = node_info("Blur", Blur)
    assert set(info) == set(reference)
    assert info["input_order"] == {"required": ["image", "radius", "mode"], "optional": ["mask"],
                                   "hidden": ["unique_id"]}
    assert info["input"]["required"]["mode"] == [["box", "gauss"]]  # JSON shape: tuples are lists
    assert info["output"] == ["IMAGE", "MASK"] and info["output_name"] == ["IMAGE", "MASK"]
    assert info["output_is_list"] == [False, False]
    assert (info["display_name"], info["category"], info["output_node"]) == ("Blur", "test/image", False)
    assert (info["description"], info["python_module"]) == ("", "nodes")
    json.dumps(info)


def test_node_info_optional_fields():
    info = node_info("Flagged", Flagged, display_name="Flagged Blur")
    assert set(info) - set(node_info("Blur", Blur)) == {"output_tooltips", "deprecated", "experimental"}
    assert info["output_tooltips"] == ["the image", "the mask"]
    assert (info["display_name"], info["output_node"], info["output_name"][0]) == ("Flagged Blur", True, "blurred")


def test_object_info_table():
    table = object_info({"Blur": Blur, "Flagged": Flagged}, {"Flagged": "Flagged Blur"})
    assert list(table) == ["Blur", "Flagged"]
    assert table["Blur"]["display_name"] == "Blur" and table["Flagged"]["display_name"] == "Flagged Blur"


def test_api_to_ui_gives_a_force_input_no_widget_slot():
    """The canvas stores no widget value for a forceInput input (Load Video's fps socket): giving it a slot
    shifted the upload button's value into it. Only the constant itself cannot travel to the UI form."""
    from comfyui_video_edit.headless import object_info, ui_to_api
    from comfyui_video_edit.headless.api_to_ui import api_to_ui
    from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    info = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
    workflow = Path(__file__).resolve().parents[1] / "workflows" / "long_clip_edit.json"
    api = ui_to_api(json.loads(workflow.read_text()), info)
    assert ui_to_api(api_to_ui(api, info), info) == api
    loader = next(k for k, v in api.items() if v["class_type"] == "VE_LoadVideoLatents")
    api[loader]["inputs"]["fps"] = 12.0
    back = ui_to_api(api_to_ui(api, info), info)
    assert {k: v for k, v in back[loader]["inputs"].items()} == \
        {k: v for k, v in api[loader]["inputs"].items() if k != "fps"}
