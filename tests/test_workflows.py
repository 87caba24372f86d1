"""Every shipped workflow runs headless on builtin:tiny; UI and API forms of a graph agree."""

import json
from pathlib import Path

import pytest
import torch

from comfyui_video_edit.headless import execute, object_info, ui_to_api
from comfyui_video_edit.headless.api_to_ui import api_to_ui
from comfyui_video_edit.headless.cli import main
from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_bridge
from comfyui_video_edit.pipelines_core.video.decode import load_video

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
INFO = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
# Smaller settings so every graph runs in seconds; the graph itself is unchanged.
QUICK = {"VE_LoadVideo": {"frame_cap": 4}, "VE_CrossFrameSampler": {"steps": 4}, "VE_DDIMInvert": {"steps": 4},
         "VE_RFInvert": {"steps": 4}, "VE_InjectFlowEdit": {"n_max": 4}}  # the inversions run the sampler's steps


def quick(prompt: dict) -> dict:
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        node["inputs"].update(QUICK.get(node["class_type"], {}))
    return out


def workflow_prompt(path: Path) -> dict:
    return ui_to_api(json.loads(path.read_text()), INFO)


def test_there_are_workflows():
    assert any(p.name == "sdedit_crossframe.json" for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_is_ui_format_on_builtin_tiny(path):
    data = json.loads(path.read_text())
    assert "nodes" in data and "links" in data, "workflows/ holds canvas (UI) files"
    models = [n for n in workflow_prompt(path).values() if n["class_type"] == "VE_LoadModel"]
    # the tiny built-in models run anywhere offline (the InstructPix2Pix-, SDXL- and Flux-shaped ones too)
    tiny = ("builtin:tiny", "builtin:tiny-ip2p", "builtin:tiny-sdxl", "builtin:tiny-flux")
    assert models and all(n["inputs"]["checkpoint"] in tiny for n in models)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_runs_headless_and_writes_its_file(path, tmp_path):
    result = execute(quick(workflow_prompt(path)), NODE_CLASS_MAPPINGS)
    written = [r[0] for node_id, r in result.outputs.items() if "images" in result.ui.get(node_id, {})]
    assert written and all(Path(p).exists() and str(p).startswith(str(tmp_path)) for p in written)


def test_ui_and_api_forms_give_identical_outputs(tmp_path):
    api = quick(workflow_prompt(WORKFLOWS[[p.name for p in WORKFLOWS].index("sdedit_crossframe.json")]))
    ui = api_to_ui(api, INFO)
    from_api = execute(api, NODE_CLASS_MAPPINGS)
    from_ui = execute(ui_to_api(ui, INFO), NODE_CLASS_MAPPINGS)
    sampler = next(k for k, v in api.items() if v["class_type"] == "VE_CrossFrameSampler")
    assert torch.equal(from_api.outputs[sampler][0], from_ui.outputs[sampler][0])


def test_demo_command_writes_an_mp4_matching_the_sample_clip(tmp_path, capsys):
    """The README's demo: the bundled clip through SDEdit with first+previous attention. Quick: the sampler
    runs 2 steps (a --set override, as a user would write it); every frame of the clip still goes through."""
    demo = next(p for p in WORKFLOWS if p.name == "sdedit_crossframe.json")
    prompt = workflow_prompt(demo)
    sampler = next(k for k, v in prompt.items() if {"steps", "attention"} <= set(v["inputs"]))
    loader = next(k for k, v in prompt.items() if "frame_cap" in v["inputs"])
    quick_steps = ["--set", f"{sampler}.steps=2"]
    assert main(["run", str(demo), "--output-dir", str(tmp_path), *quick_steps]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.endswith(".mp4") and Path(printed).is_file()
    out, info, audio = load_video(printed)
    src, src_info, _ = load_video(str(Path(__file__).resolve().parents[1] / "assets" / "sample_pan.mp4"))
    assert out.shape == src.shape and info["fps"] == src_info["fps"]
    assert audio is not None
    # A second run (of 2 frames: only its file name matters) never overwrites the first file.
    assert main(["run", str(demo), "--output-dir", str(tmp_path), *quick_steps, "--set", f"{loader}.frame_cap=2"]) == 0
    second = capsys.readouterr().out.strip().splitlines()[-1]
    assert second != printed and Path(printed).is_file()
