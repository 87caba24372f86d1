"""What the first run in a real ComfyUI found, each pinned so it cannot come back."""

import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from comfyui_video_edit.headless import object_info
from comfyui_video_edit.headless.convert import VIRTUAL_TYPES, types_connect, ui_to_api
from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_video_edit.pipelines_core.video.encode import encode_video

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
INFO = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_workflow_has_known_nodes_and_typed_links(path):
    """The canvas shows a red missing-node box for an unknown type and refuses a link whose types differ."""
    ui = json.loads(path.read_text())
    nodes = {node["id"]: node for node in ui["nodes"]}
    for node in nodes.values():
        assert node["type"] in INFO or node["type"] in VIRTUAL_TYPES, f"{path.name}: unknown node {node['type']}"
    for link_id, origin, origin_slot, target, target_slot, link_type in ui["links"]:
        source_info, target_node = INFO[nodes[origin]["type"]], nodes[target]
        produced = source_info["output"][origin_slot]
        socket = target_node["inputs"][target_slot]
        spec = {**INFO[target_node["type"]]["input"].get("required", {}),
                **INFO[target_node["type"]]["input"].get("optional", {})}[socket["name"]]
        assert link_type == produced and types_connect(produced, spec[0]), \
            f"{path.name}: link {link_id} carries {produced} into {target_node['type']}.{socket['name']} ({spec[0]})"
        assert socket["link"] == link_id
    assert ui_to_api(ui, INFO)  # and the converter takes it whole


def test_written_files_follow_the_umask_and_are_not_executable(tmp_path):
    """Output files were created 0755: os.open's default mode is 0777."""
    path = encode_video(torch.rand(2, 16, 16, 3), tmp_path, "clip", 8.0)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_controlnet_condition_logs_no_float32_warning(tiny_model, clip_frames):
    """diffusers warned 'modules ... should be kept in float32: []' on every ControlNet run."""
    records = _Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        node = NODE_CLASS_MAPPINGS["VE_ControlNetCondition"]()
        control, hints = node.condition(tiny_model, clip_frames, "builtin:tiny", "none", 1.0, 0.0, 1.0, False, True)
    finally:
        logger.removeHandler(records)
    assert len(control) == 1 and hints.shape == clip_frames.shape
    assert not [m for m in records.messages if "float32" in m], records.messages


def test_the_sampler_decodes_frames_only_when_something_reads_them(tmp_path):
    """A long clip streamed as latents must never exist in pixels: with only its latent output linked, the
    sampler skips the VAE decode (it reads the running prompt through ComfyUI's hidden PROMPT/UNIQUE_ID)."""
    from comfyui_video_edit.headless import execute
    from comfyui_video_edit.nodes import comfy_bridge

    sampler = {"model": ["2", 0], "prompt": "a cat", "negative_prompt": "", "seed": 1, "steps": 2, "cfg": 7.5,
               "scheduler": "ddim", "strength": 0.5, "noise": "per_frame", "attention": "first+previous",
               "attention_layers": "all", "chunk_size": 8}
    prompt = {
        "1": {"class_type": "VE_LoadVideo", "inputs": {"video": "sample_pan.mp4", "frame_cap": 2, "skip_first": 0,
                                                       "every_nth": 1, "target_fps": 0.0, "width": 64, "height": 0,
                                                       "multiple_of": "8", "fit": "crop"}},
        "2": {"class_type": "VE_LoadModel", "inputs": {"checkpoint": "builtin:tiny", "dtype": "fp32", "device": "cpu"}},
        "3": {"class_type": "VE_CrossFrameSampler", "inputs": {**sampler, "images": ["1", 0]}},
        "4": {"class_type": "VE_CrossFrameSampler", "inputs": {**sampler, "latent": ["3", 1]}},
        "5": {"class_type": "VE_VideoEncode", "inputs": {"frames": ["4", 0], "fps": 8.0, "format": "h264-mp4",
                                                         "quality": -1.0, "filename_prefix": "decode_check"}},
    }
    result = execute(prompt, NODE_CLASS_MAPPINGS)
    assert result.outputs["3"][0] is None and result.outputs["3"][1]["samples"].shape[0] == 2
    assert result.outputs["4"][0].shape == (2, 48, 64, 3)
