"""Method nodes: one Attention Injector per paper, found by the registry; the old mode-switch node names them."""

import json
from pathlib import Path

import pytest
import torch

from comfyui_video_edit.headless import WorkflowError, execute, object_info, ui_to_api, validate
from comfyui_video_edit.headless.cli import main
from comfyui_video_edit.nodes import METHODS, NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_video_edit.nodes.attention_injector import VE_AttentionInjector
from comfyui_video_edit.nodes.methods import PREFIX, MethodNode, discover, markdown_table
from comfyui_video_edit.pipelines_core.methods.fatezero import FateZeroParams
from comfyui_video_edit.pipelines_core.methods.pix2video import Pix2VideoParams
from comfyui_video_edit.pipelines_core.methods.plug_and_play import PnPParams
from comfyui_video_edit.pipelines_core.methods.tokenflow import TokenFlowParams
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video

ROOT = Path(__file__).resolve().parents[1]
INFO = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
# The old node's widgets, in its order, after `inversion` and `mode`; each method node takes its own of them.
OLD_WIDGETS = list(VE_AttentionInjector.INPUT_TYPES()["required"])[2:]
OWN_WIDGETS = {
    "FateZero": OLD_WIDGETS[:9],
    "Plug-and-Play": ["pnp_f_t", "pnp_attn_t"],
    "TokenFlow": ["pnp_f_t", "pnp_attn_t", "keyframe_every", "keyframe_weights"],
    "Pix2Video": ["guidance_weight", "guidance_until"],
}
# What each node gives with its defaults: exactly the engine's defaults, the papers'.
DEFAULT_PARAMS = {"FateZero": FateZeroParams(), "Plug-and-Play": PnPParams(),
                  "TokenFlow": TokenFlowParams(), "Pix2Video": Pix2VideoParams()}


def by_name(name):
    return next(m for m in METHODS if m.name == name)


def defaults(cls) -> dict:
    return {k: spec[1]["default"] for k, spec in cls.INPUT_TYPES()["required"].items() if "default" in spec[1]}


@pytest.fixture(scope="module")
def inversion(tiny_model):
    frames = torch.rand(3, 32, 40, 3, generator=torch.Generator().manual_seed(3))
    return invert_video(tiny_model, frames, "", steps=2)


def test_the_registry_finds_one_node_per_method_file():
    files = sorted(p.stem for p in (ROOT / "nodes").glob(f"{PREFIX}*.py"))
    assert [m.node.__module__.rsplit(".", 1)[-1] for m in discover()] == files
    assert set(OWN_WIDGETS) <= {m.name for m in METHODS}  # the old node's modes, and the methods added since
    for method in METHODS:
        assert NODE_CLASS_MAPPINGS[method.node_id] is method.node
        assert NODE_DISPLAY_NAME_MAPPINGS[method.node_id] == method.display_name
        assert method.display_name.endswith(f" ({method.name})")  # "Attention Injector (FateZero)", "Grid Shuffle (RAVE)"
        assert method.paper.url.startswith("https://") and method.paper.venue[-4:].isdigit()


@pytest.mark.parametrize("name", list(OWN_WIDGETS))
def test_a_method_node_has_its_own_widgets_as_the_old_node_had_them(name):
    old = VE_AttentionInjector.INPUT_TYPES()["required"]
    node = by_name(name).node
    required = node.INPUT_TYPES()["required"]
    assert list(required) == ["inversion", *OWN_WIDGETS[name]]
    assert required["inversion"] == old["inversion"]
    for widget in OWN_WIDGETS[name]:  # same type, default, range; the tooltip without the method's prefix
        (kind, options), (old_kind, old_options) = required[widget], old[widget]
        assert kind == old_kind and {**options, "tooltip": ""} == {**old_options, "tooltip": ""}
        assert old_options["tooltip"].lower().endswith(options["tooltip"].lower())
    assert (node.RETURN_TYPES, node.CATEGORY) == (("VE_INJECTION",), "video edit/inversion")
    assert INFO[by_name(name).node_id].get("deprecated") is None


@pytest.mark.parametrize("name", list(OWN_WIDGETS))
def test_a_method_node_with_its_defaults_builds_the_papers_injection(name, inversion):
    node = by_name(name).node
    injection, = getattr(node(), node.FUNCTION)(inversion=inversion, **defaults(node))
    assert injection.params == DEFAULT_PARAMS[name] and injection.inversion is inversion


def test_the_old_node_is_deprecated_and_names_its_replacement_for_each_mode():
    assert VE_AttentionInjector.DEPRECATED is True and INFO["VE_AttentionInjector"]["deprecated"] is True
    widgets = defaults(VE_AttentionInjector)
    for method in METHODS:
        with pytest.raises(ValueError) as raised:
            VE_AttentionInjector().build(inversion=None, **{**widgets, "mode": method.name})
        message = str(raised.value)
        assert f"'{method.display_name}'" in message and "same widget names" in message and "\n" not in message


def old_saved_workflow(name: str) -> dict:
    """A shipped workflow as it was saved before the split: its injector is the mode-switch node."""
    data = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    node = next(n for n in data["nodes"] if n["type"].startswith("VE_Inject"))
    method = next(m for m in METHODS if m.node_id == node["type"])
    values = dict(zip(OWN_WIDGETS[method.name], node["widgets_values"]))
    old = {**defaults(VE_AttentionInjector), **values, "mode": method.name}
    node["type"] = "VE_AttentionInjector"
    node["inputs"] = [i for i in node["inputs"] if i["name"] == "inversion"]
    node["widgets_values"] = [old[k] for k in ["mode", *OLD_WIDGETS]]
    return data


def quick(prompt: dict) -> dict:
    for entry in prompt.values():
        if entry["class_type"] in ("VE_DDIMInvert", "VE_CrossFrameSampler"):
            entry["inputs"]["steps"] = 2
        if entry["class_type"] == "VE_LoadVideo":
            entry["inputs"]["frame_cap"] = 2
    return prompt


def test_an_old_workflow_still_converts_and_stops_at_validation_naming_the_new_node(tmp_path, capsys):
    prompt = quick(ui_to_api(old_saved_workflow("fatezero_edit"), INFO))
    injector = next(k for k, v in prompt.items() if v["class_type"] == "VE_AttentionInjector")
    assert prompt[injector]["inputs"]["equalizer_words"] == "watercolor"  # the old widget order still converts
    problems = validate(prompt, NODE_CLASS_MAPPINGS)
    assert len(problems) == 1
    assert "replace this node (mode FateZero) by 'Attention Injector (FateZero)'" in str(problems[0])
    with pytest.raises(WorkflowError):  # before any node runs
        execute(prompt, NODE_CLASS_MAPPINGS, outputs=[injector])

    path = tmp_path / "old.json"
    path.write_text(json.dumps(old_saved_workflow("pix2video_edit")))
    assert main(["run", str(path), "--output-dir", str(tmp_path), "--set", "1.frame_cap=2", "--set", "3.steps=2",
                 "--set", "5.steps=2"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DDIM Invert:" not in err  # stopped before anything ran
    assert "replace this node (mode Pix2Video) by 'Attention Injector (Pix2Video)'" in err


@pytest.mark.parametrize("path", sorted((ROOT / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_shipped_workflows_use_no_deprecated_node(path):
    for entry in ui_to_api(json.loads(path.read_text()), INFO).values():
        assert not getattr(NODE_CLASS_MAPPINGS[entry["class_type"]], "DEPRECATED", False), entry["class_type"]


def node_types(workflow: Path) -> set:
    """The node types a UI-format workflow holds, its subgraphs' included."""
    data = json.loads(workflow.read_text())
    graphs = [data, *data.get("definitions", {}).get("subgraphs", [])]
    return {node["type"] for graph in graphs for node in graph.get("nodes", [])}


def test_each_method_node_lists_exactly_the_shipped_workflows_that_use_it():
    shipped = {path.name: node_types(path) for path in (ROOT / "workflows").glob("*.json")}
    for method in METHODS:
        assert method.workflows, f"{method.name}: METHOD lists no workflow"
        assert len(set(method.workflows)) == len(method.workflows), method.workflows
        for name in method.workflows:  # a renamed workflow, or a workflow that lost the node, fails here
            assert name in shipped, f"{method.name} lists {name}, which is not in workflows/"
            assert method.node_id in shipped[name], f"{name} has no {method.node_id} node"
        using = {name for name, types in shipped.items() if method.node_id in types}
        assert set(method.workflows) == using, f"{method.name}: {sorted(using)} use {method.node_id}"
    assert any(len(m.workflows) > 1 for m in METHODS)  # FateZero's injector also drives the Video-P2P recipe


@pytest.mark.parametrize("workflows", [["fatezero_edit.json"], ("fatezero_edit",), ("workflows/fatezero_edit.json",),
                                       (3,)])
def test_a_method_node_rejects_workflows_that_are_not_file_names_in_a_tuple(workflows):
    fatezero = by_name("FateZero")
    with pytest.raises(ValueError, match="workflows must be a tuple of file names"):
        MethodNode(fatezero.name, fatezero.display_name, fatezero.node, fatezero.paper, fatezero.mechanism, workflows)


def test_the_readme_holds_exactly_the_generated_methods_table(capsys):
    assert main(["nodes", "--methods"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == markdown_table(METHODS)
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = readme.index("### Methods")
    first = next(i for i in range(start, len(readme)) if readme[i].startswith("|"))
    end = next(i for i in range(first, len(readme) + 1) if i == len(readme) or not readme[i].startswith("|"))
    assert "\n".join(readme[first:end]) == printed
    assert "`VE_AttentionInjector`" not in "\n".join(readme)


def test_nodes_lists_the_method_nodes_and_the_deprecated_node_in_groups(capsys):
    assert main(["nodes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    methods_at = lines.index(next(x for x in lines if x.startswith("# methods")))
    deprecated_at = lines.index(next(x for x in lines if x.startswith("# deprecated")))
    assert lines[methods_at + 1:deprecated_at - 1] == [
        f"{m.node_id}\t{m.display_name}\t{m.paper.cite()}" for m in METHODS]
    assert lines[deprecated_at + 1:] == ["VE_AttentionInjector\tAttention Injector (deprecated)"]
    assert len([x for x in lines if x and not x.startswith("#")]) == len(NODE_CLASS_MAPPINGS)
