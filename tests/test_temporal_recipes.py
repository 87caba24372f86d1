"""Temporal recipes end to end on the bundled clip: the Rerender graph is steadier than the same graph
with every temporal feature off, measured by the warp error under the source clip's flow."""

import json
from pathlib import Path

import pytest

from comfyui_video_edit.headless import execute, object_info, ui_to_api
from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_bridge
from comfyui_video_edit.pipelines_core.flow.warp import warp_error
from comfyui_video_edit.pipelines_core.flow.estimate import estimate_flow

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
INFO = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)


def run(prompt, tmp_path):
    comfy_bridge.set_output_directory(str(tmp_path))
    result = execute(prompt, NODE_CLASS_MAPPINGS)
    by_class = {v["class_type"]: k for k, v in prompt.items()}
    return result.outputs[by_class["VE_LoadVideo"]][0], result.outputs[by_class["VE_CrossFrameSampler"]][0]


@pytest.fixture(scope="module")
def rerender():
    prompt = ui_to_api(json.loads((WORKFLOWS / "rerender_edit.json").read_text()), INFO)
    for node in prompt.values():
        if node["class_type"] == "VE_LoadVideo":
            node["inputs"]["frame_cap"] = 6
        if node["class_type"] == "VE_CrossFrameSampler":
            node["inputs"]["steps"] = 8
    return prompt


def without_temporal_features(prompt):
    off = json.loads(json.dumps(prompt))
    for node in off.values():
        if node["class_type"] == "VE_CrossFrameSampler":
            node["inputs"].pop("temporal")
            node["inputs"]["attention"] = "none"
    return off


def test_rerender_recipe_is_steadier_than_no_temporal_features(rerender, tmp_path):
    source, guided = run(rerender, tmp_path)
    _, plain = run(without_temporal_features(rerender), tmp_path)
    flow = estimate_flow(source)
    guided_error, plain_error = warp_error(guided, flow), warp_error(plain, flow)
    print(f"rerender warp error {guided_error:.5f} vs no temporal features {plain_error:.5f}")
    assert guided_error < plain_error
