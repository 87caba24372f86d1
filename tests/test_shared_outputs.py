"""A node's output is shared by every later graph (ComfyUI caches it): no node may change its inputs.

ComfyUI keeps Load Model's and Load Video's outputs between prompts and hands the same objects to
every later graph. This test runs every shipped workflow in turn in one process the same way: source
nodes (no links in) with equal inputs return the very same objects, the LoRA graph first. Each node's
inputs are fingerprinted (every tensor, every module's weights and structure) before and after the
call, and each graph's frames must equal those of a fresh run of it alone.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from comfyui_video_edit.headless import execute, object_info, ui_to_api
from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_bridge

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"),
                   key=lambda p: (p.stem != "lora_sdedit", p.stem))  # the LoRA graph first
INFO = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
QUICK = {"VE_LoadVideo": {"frame_cap": 3}, "VE_CrossFrameSampler": {"steps": 3}, "VE_DDIMInvert": {"steps": 3},
         "VE_RFInvert": {"steps": 3}, "VE_InjectFlowEdit": {"n_max": 3}}  # the inversions run the sampler's steps


def quick_prompt(path: Path) -> dict:
    prompt = ui_to_api(json.loads(path.read_text()), INFO)
    for node in prompt.values():
        node["inputs"].update(QUICK.get(node["class_type"], {}))
    return prompt


def fingerprint(value, seen=None) -> object:
    """Everything a node could change in place, reduced to hashable data."""
    seen = {} if seen is None else seen  # id -> object: holding it keeps the id from being reused
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, torch.Tensor):  # no cycles through a tensor; state_dict() makes new ones each call
        data = value.detach().cpu().contiguous()
        return ("tensor", tuple(data.shape), str(data.dtype), hashlib.sha1(data.view(torch.uint8).numpy().tobytes()
                                                                          if data.numel() else b"").hexdigest())
    if id(value) in seen:  # objects already fingerprinted in this walk (and cycles)
        return "<seen>"
    seen[id(value)] = value
    if isinstance(value, torch.nn.Module):
        structure = tuple(type(m).__name__ for m in value.modules())  # peft wrappers change this
        processors = tuple(sorted((k, type(p).__name__) for k, p in getattr(value, "attn_processors", {}).items()))
        return ("module", structure, processors, fingerprint(dict(value.state_dict()), seen))
    if isinstance(value, dict):
        return ("dict", tuple((str(k), fingerprint(v, seen)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(fingerprint(v, seen) for v in value))
    if dataclasses.is_dataclass(value):
        return ("dataclass", type(value).__name__,
                tuple((f.name, fingerprint(getattr(value, f.name), seen)) for f in dataclasses.fields(value)))
    if hasattr(value, "__dict__"):
        return ("object", type(value).__name__, fingerprint(vars(value), seen))
    return ("other", type(value).__name__)


def shared_mappings(changed: list) -> dict:
    """The pack's node classes, run as ComfyUI's cache runs them: a source node with the same inputs
    gives back the same objects, and every call's inputs are fingerprinted before and after."""
    cache: dict = {}
    mappings = {}
    for class_type, cls in NODE_CLASS_MAPPINGS.items():
        original = getattr(cls, cls.FUNCTION)

        def call(self, _original=original, _class_type=class_type, **inputs):
            key = (_class_type, json.dumps(inputs, sort_keys=True, default=repr))
            is_source = all(isinstance(v, (str, int, float, bool)) for v in inputs.values())
            if is_source and key in cache:
                return cache[key]
            before = fingerprint(inputs)
            result = _original(self, **inputs)
            if fingerprint(inputs) != before:
                changed.append(_class_type)
            if is_source:
                cache[key] = result
            return result

        mappings[class_type] = type(cls.__name__, (cls,), {cls.FUNCTION: call})
    return mappings


def sampler_frames(prompt: dict, result) -> list:
    """Every sampler's latents: what it made (its frames output is only decoded when a node reads it)."""
    return [result.outputs[k][1]["samples"] for k, v in prompt.items() if v["class_type"] == "VE_CrossFrameSampler"]


def test_every_graph_in_one_process_leaves_shared_outputs_unchanged_and_gives_fresh_frames(tmp_path):
    assert WORKFLOWS[0].stem == "lora_sdedit"
    changed: list = []
    shared = shared_mappings(changed)
    for path in WORKFLOWS:
        prompt = quick_prompt(path)
        in_session = sampler_frames(prompt, execute(prompt, shared))
        assert not changed, f"{path.stem}: {changed} changed an input in place"
        fresh = sampler_frames(prompt, execute(prompt, NODE_CLASS_MAPPINGS))
        assert in_session and all(torch.equal(a, b) for a, b in zip(in_session, fresh)), \
            f"{path.stem} gives other frames after the graphs before it"


def test_the_fingerprint_sees_an_in_place_change(tiny_model):
    """The check above would pass vacuously if the fingerprint missed what a LoRA leaves behind."""
    from comfyui_video_edit.pipelines_core.models.lora import _remove_adapters

    before = fingerprint({"model": tiny_model})
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), tiny_model.unet)
    assert fingerprint({"model": tiny_model}) != before
    _remove_adapters(tiny_model.unet)
    assert fingerprint({"model": tiny_model}) == before
