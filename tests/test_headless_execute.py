"""The headless executor and the `video-edit` command, over small test-only node classes."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from comfyui_video_edit.headless.cli import main
from comfyui_video_edit.headless.convert import ui_to_api
from comfyui_video_edit.headless.execute import (
    NodeExecutionError, OverrideSyntaxError, WorkflowError, apply_overrides, execute, validate,
)
from comfyui_video_edit.headless.object_info import object_info

RUN_LOG: list = []  # (class name, kwargs) of every node call, in call order


class Number:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": -100, "max": 100})}}

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "make"

    def make(self, value):
        RUN_LOG.append(("Number", {"value": value}))
        return (value,)


class Combine:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"a": ("NUMBER",), "b": ("NUMBER",), "op": (["add", "mul"],)},
            "optional": {"offset": ("INT", {"default": 0})},
        }

    RETURN_TYPES = ("NUMBER", "STRING")
    FUNCTION = "combine"

    def combine(self, a, b, op, **optional):
        RUN_LOG.append(("Combine", {"a": a, "b": b, "op": op, **optional}))
        value = (a + b if op == "add" else a * b) + optional.get("offset", 0)
        return value, f"{a} {op} {b}"


class Show:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"number": ("NUMBER",)},
                "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True

    def show(self, number, unique_id=None, prompt=None):
        RUN_LOG.append(("Show", {"number": number, "unique_id": unique_id, "prompt": prompt}))
        return {"ui": {"text": [str(number)]}}


class SaveText:
    directory = None  # set by the test

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True}), "name": ("STRING", {"default": "out"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    def save(self, text, name):
        path = SaveText.directory / f"{name}.txt"
        path.write_text(text)
        RUN_LOG.append(("SaveText", {"text": text}))
        return {"ui": {"images": [{"filename": path.name, "subfolder": "", "type": "output"}]},
                "result": (str(path),)}


class Even:
    """VALIDATE_INPUTS names `value`: its built-in max is not checked, the class's rule is."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"max": 10})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        return True if value % 2 == 0 else f"value {value} must be even: pick an even number"

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "make"

    def make(self, value):
        return (value,)


class Boom:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"number": ("NUMBER",)}}

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "explode"

    def explode(self, number):
        raise ValueError("kaboom")


class InferenceProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True

    def probe(self):
        import torch
        return {"ui": {"inference_mode": [torch.is_inference_mode_enabled()]}}


class FakeSampler:
    """Registered under the sampler's class name so the CLI shortcuts find it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompt": ("STRING", {"default": ""}), "seed": ("INT", {"default": 0, "min": 0})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "sample"

    def sample(self, prompt, seed):
        return (f"{prompt}|{seed}",)


NODES = {"Number": Number, "Combine": Combine, "Show": Show, "SaveText": SaveText, "Even": Even,
         "Boom": Boom, "InferenceProbe": InferenceProbe, "VE_CrossFrameSampler": FakeSampler}
DISPLAY = {"Number": "Number", "Combine": "Combine Numbers", "Show": "Show Number", "SaveText": "Save Text"}


@pytest.fixture(autouse=True)
def fresh_log(tmp_path):
    RUN_LOG.clear()
    SaveText.directory = tmp_path
    yield
    RUN_LOG.clear()


def link(node_id, slot=0):
    return [str(node_id), slot]


def diamond() -> dict:
    """1 feeds 2 and 3 (twice each), 2 and 3 feed 4, 4 feeds the Show node 5. Node 9 is unused."""
    return {
        "5": {"class_type": "Show", "inputs": {"number": link(4)}},
        "4": {"class_type": "Combine", "inputs": {"a": link(2), "b": link(3), "op": "mul"}},
        "3": {"class_type": "Combine", "inputs": {"a": link(1), "b": link(1), "op": "mul"}},
        "2": {"class_type": "Combine", "inputs": {"a": link(1), "b": link(1), "op": "add", "offset": 1}},
        "1": {"class_type": "Number", "inputs": {"value": 3}, "_meta": {"title": "Three"}},
        "9": {"class_type": "Number", "inputs": {"value": 1000}},  # invalid, but unreachable
    }


def calls(name):
    return [kwargs for cls, kwargs in RUN_LOG if cls == name]


# --- executing -----------------------------------------------------------------------------


def test_dependency_order_each_node_once():
    result = execute(diamond(), NODES)
    assert result.order.index("1") < min(result.order.index("2"), result.order.index("3"))
    assert max(result.order.index("2"), result.order.index("3")) < result.order.index("4") < result.order.index("5")
    assert sorted(result.order) == ["1", "2", "3", "4", "5"]
    assert len(calls("Number")) == 1 and len(calls("Combine")) == 3 and len(calls("Show")) == 1
    assert result.ui == {"5": {"text": [str((3 + 3 + 1) * (3 * 3))]}}
    assert result.outputs["4"] == (63, "7 mul 9")


def test_unreachable_nodes_are_not_validated_or_run():
    prompt = diamond()
    prompt["8"] = {"class_type": "Boom", "inputs": {"number": link(1)}}
    execute(prompt, NODES)
    assert [kwargs["value"] for kwargs in calls("Number")] == [3]


def test_optional_inputs_absent_are_not_passed():
    execute(diamond(), NODES)
    offsets = sorted("offset" in kwargs for kwargs in calls("Combine"))
    assert offsets == [False, False, True]


def test_hidden_inputs_and_ui_result():
    prompt = diamond()
    execute(prompt, NODES)
    (shown,) = calls("Show")
    assert shown["unique_id"] == "5"
    assert shown["prompt"] == prompt


def test_nothing_is_cached_between_runs():
    execute(diamond(), NODES)
    execute(diamond(), NODES)
    assert len(calls("Number")) == 2


def test_outputs_argument_picks_targets():
    prompt = diamond()
    prompt["6"] = {"class_type": "Show", "inputs": {"number": link(1)}}
    result = execute(prompt, NODES, outputs=["6"])
    assert result.order == ["1", "6"]


def test_runs_under_inference_mode():
    result = execute({"1": {"class_type": "InferenceProbe", "inputs": {}}}, NODES)
    assert result.ui["1"] == {"inference_mode": [True]}


def test_constants_are_cast_and_unwrapped():
    prompt = {
        "1": {"class_type": "Number", "inputs": {"value": "7"}},
        "2": {"class_type": "Show", "inputs": {"number": link(1)}},
    }
    assert execute(prompt, NODES).outputs["1"] == (7,)
    prompt["1"]["inputs"]["value"] = {"__value__": 5.0}
    assert execute(prompt, NODES).outputs["1"] == (5,)


def test_node_exception_names_the_node():
    prompt = diamond()
    prompt["4"] = {"class_type": "Boom", "inputs": {"number": link(2)}, "_meta": {"title": "Exploder"}}
    with pytest.raises(NodeExecutionError) as caught:
        execute(prompt, NODES)
    message = str(caught.value)
    assert "node 4" in message and "Exploder" in message and "(Boom)" in message and "kaboom" in message
    assert isinstance(caught.value.__cause__, ValueError)
    assert calls("Show") == []


# --- validating ----------------------------------------------------------------------------


def test_validation_errors_name_node_and_input_and_nothing_runs():
    prompt = diamond()
    del prompt["2"]["inputs"]["b"]                                   # missing input
    prompt["1"]["inputs"]["value"] = 101                             # above max
    prompt["3"]["inputs"]["op"] = "pow"                              # not in combo
    prompt["4"]["inputs"]["a"] = link(2, 1)                          # STRING into NUMBER
    prompt["7"] = {"class_type": "Mystery", "inputs": {}}            # unknown class
    problems = validate(prompt, NODES)
    assert [p.kind for p in problems] == ["invalid_prompt"]  # unknown classes are reported first
    assert problems[0].node_id == "7" and "Mystery" in str(problems[0])

    del prompt["7"]
    problems = validate(prompt, NODES)
    found = {(p.node_id, p.input_name, p.kind) for p in problems}
    assert found == {
        ("2", "b", "required_input_missing"),
        ("1", "value", "value_bigger_than_max"),
        ("3", "op", "value_not_in_list"),
        ("4", "a", "return_type_mismatch"),
    }
    with pytest.raises(WorkflowError) as caught:
        execute(prompt, NODES)
    assert len(caught.value.errors) == 4
    for node_id, name, _ in found:
        assert f"node {node_id}" in str(caught.value) and f"'{name}'" in str(caught.value)
    assert RUN_LOG == []


def test_link_problems():
    prompt = diamond()
    prompt["4"]["inputs"]["a"] = link(42)
    prompt["4"]["inputs"]["b"] = link(3, 5)
    problems = {p.input_name: p for p in validate(prompt, NODES)}
    assert "not in the workflow" in problems["a"].message
    assert "output 5" in problems["b"].message


def test_link_into_undeclared_input_is_reported_unless_function_takes_kwargs():
    prompt = diamond()
    prompt["5"]["inputs"]["numbr"] = link(1)  # Show.show has no **kwargs
    (problem,) = validate(prompt, NODES)
    assert (problem.node_id, problem.input_name) == ("5", "numbr") and "no such input" in problem.message
    prompt = diamond()
    prompt["4"]["inputs"]["extra"] = link(1)  # Combine.combine takes **optional
    assert validate(prompt, NODES) == []


def test_bad_constant_type():
    prompt = diamond()
    prompt["1"]["inputs"]["value"] = "three"
    (problem,) = validate(prompt, NODES)
    assert (problem.node_id, problem.input_name, problem.kind) == ("1", "value", "invalid_input_type")


def test_no_output_node():
    (problem,) = validate({"1": {"class_type": "Number", "inputs": {"value": 1}}}, NODES)
    assert problem.kind == "prompt_no_outputs"


def test_star_and_comma_types_match():
    from comfyui_video_edit.headless.execute import types_match
    assert types_match("IMAGE", "IMAGE") and types_match("*", "MASK") and types_match("IMAGE", "*")
    assert types_match("IMAGE,MASK", "MASK") and not types_match("IMAGE", "MASK")


def test_validate_inputs_replaces_builtin_checks():
    def prompt_with(value):
        return {"1": {"class_type": "Even", "inputs": {"value": value}},
                "2": {"class_type": "Show", "inputs": {"number": link(1)}}}

    assert validate(prompt_with(12), NODES) == []  # above the declared max, but VALIDATE_INPUTS owns `value`
    (problem,) = validate(prompt_with(3), NODES)
    assert problem.kind == "custom_validation_failed" and "must be even" in problem.message


def test_dependency_cycle_is_reported():
    prompt = diamond()
    prompt["2"]["inputs"]["a"] = link(4)
    (problem,) = validate(prompt, NODES)
    assert problem.kind == "dependency_cycle" and "4" in problem.message


# --- overrides -----------------------------------------------------------------------------


def test_overrides_parse_json_and_do_not_mutate():
    prompt = diamond()
    updated = apply_overrides(prompt, ["1.value=5", '3.op="add"', "2.op=mul", "4.a=[\"1\", 0]"])
    assert updated["1"]["inputs"]["value"] == 5
    assert updated["3"]["inputs"]["op"] == "add" and updated["2"]["inputs"]["op"] == "mul"
    assert updated["4"]["inputs"]["a"] == ["1", 0]
    assert prompt == diamond()
    assert execute(updated, NODES).ui["5"] == {"text": [str(5 * (5 + 5))]}  # 4 = a * (5 add 5)


def test_override_errors():
    with pytest.raises(WorkflowError, match="no node 77"):
        apply_overrides(diamond(), ["77.value=1"])
    with pytest.raises(WorkflowError, match="has no input 'valu'"):
        apply_overrides(diamond(), ["1.valu=1"], NODES)
    with pytest.raises(OverrideSyntaxError):
        apply_overrides(diamond(), ["1value=1"])


# --- UI and API forms of one graph ---------------------------------------------------------


def ui_graph() -> dict:
    """Number(4) -> Reroute -> Combine(add, b from a PrimitiveNode) -> Show; a muted Number on the side."""
    def node(node_id, node_type, inputs=(), outputs=(), widgets=None, mode=0):
        return {"id": node_id, "type": node_type, "mode": mode, "inputs": list(inputs),
                "outputs": list(outputs), "widgets_values": widgets if widgets is not None else []}

    return {
        "last_node_id": 6, "last_link_id": 5, "version": 0.4,
        "nodes": [
            node(1, "Number", [{"name": "value", "type": "INT", "widget": {"name": "value"}, "link": None}],
                 [{"name": "NUMBER", "type": "NUMBER", "links": [1]}], [4]),
            node(2, "Reroute", [{"name": "", "type": "*", "link": 1}], [{"name": "", "type": "NUMBER", "links": [2]}]),
            node(3, "Combine", [{"name": "a", "type": "NUMBER", "link": 2}, {"name": "b", "type": "NUMBER", "link": 5},
                                {"name": "offset", "type": "INT", "widget": {"name": "offset"}, "link": 3}],
                 [{"name": "NUMBER", "type": "NUMBER", "links": [4]}], ["add", 0]),
            node(4, "Show", [{"name": "number", "type": "NUMBER", "link": 4}]),
            node(5, "PrimitiveNode", [], [{"name": "INT", "type": "INT", "widget": {"name": "offset"}, "links": [3]}],
                 [10, "fixed"]),
            node(6, "Number", [], [{"name": "NUMBER", "type": "NUMBER", "links": [5]}], [50], mode=2),
        ],
        "links": [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 3, 0, "NUMBER"], [3, 5, 0, 3, 2, "INT"],
                  [4, 3, 0, 4, 0, "NUMBER"], [5, 6, 0, 3, 1, "NUMBER"]],
    }


def test_ui_and_api_forms_give_the_same_results():
    prompt_from_ui = ui_to_api(ui_graph(), object_info(NODES, DISPLAY))
    api = {
        "1": {"class_type": "Number", "inputs": {"value": 4}},
        "3": {"class_type": "Combine", "inputs": {"op": "add", "offset": 10, "a": ["1", 0]}},  # b: muted
        "4": {"class_type": "Show", "inputs": {"number": ["3", 0]}},
    }
    assert {k: v["inputs"] for k, v in prompt_from_ui.items()} == {k: v["inputs"] for k, v in api.items()}
    assert prompt_from_ui["3"]["_meta"]["title"] == "Combine Numbers"
    # The muted node's link was dropped, so the required `b` is missing in both forms alike.
    with pytest.raises(WorkflowError, match="'b'"):
        execute(prompt_from_ui, NODES)
    fixed_ui = apply_overrides(prompt_from_ui, ["3.b=[\"1\", 0]"])
    fixed_api = apply_overrides(api, ["3.b=[\"1\", 0]"])
    assert execute(fixed_ui, NODES).ui == execute(fixed_api, NODES).ui == {"4": {"text": [str(4 + 4 + 10)]}}


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def pack(monkeypatch):
    module = types.ModuleType("ve_test_pack")
    module.NODE_CLASS_MAPPINGS = NODES
    module.NODE_DISPLAY_NAME_MAPPINGS = DISPLAY
    monkeypatch.setitem(sys.modules, "ve_test_pack", module)
    return ["--nodes", "ve_test_pack"]


def save_graph() -> dict:
    return {
        "1": {"class_type": "VE_CrossFrameSampler", "inputs": {"prompt": "a cat", "seed": 1}},
        "2": {"class_type": "SaveText", "inputs": {"text": link(1), "name": "result"}},
    }


def write(tmp_path, data, name="wf.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_cli_runs_and_prints_written_files(tmp_path, pack, capsys):
    workflow = write(tmp_path, save_graph())
    code = main(["run", workflow, *pack, "--prompt", "a dog", "--seed", "7", "--set", "2.name=final"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.strip() == str(tmp_path / "final.txt")
    assert (tmp_path / "final.txt").read_text() == "a dog|7"


def test_cli_runs_ui_workflows(tmp_path, pack, capsys):
    ui = ui_graph()  # rewire Combine.b from the muted node to the Reroute
    ui["links"] = [link for link in ui["links"] if link[0] != 5] + [[6, 2, 0, 3, 1, "NUMBER"]]
    ui["nodes"][1]["outputs"][0]["links"].append(6)
    ui["nodes"][2]["inputs"][1]["link"] = 6
    ui["nodes"][5]["outputs"][0]["links"] = []
    assert main(["run", write(tmp_path, ui), *pack]) == 0
    assert calls("Show")[0]["number"] == 4 + 4 + 10


def test_cli_validation_error_exit_1_one_line(tmp_path, pack, capsys):
    workflow = write(tmp_path, save_graph())
    code = main(["run", workflow, *pack, "--set", "1.seed=-5"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and "node 1" in err and "'seed'" in err and "Traceback" not in err


def test_cli_node_failure_exit_1_and_debug_traceback(tmp_path, pack, capsys):
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 1}},
              "2": {"class_type": "Boom", "inputs": {"number": link(1)}},
              "3": {"class_type": "Show", "inputs": {"number": link(2)}}}
    workflow = write(tmp_path, {"prompt": prompt})
    assert main(["run", workflow, *pack]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and "node 2" in err and "kaboom" in err
    assert main(["run", workflow, *pack, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_cli_usage_and_input_errors(tmp_path, pack, capsys):
    workflow = write(tmp_path, save_graph())
    assert main(["run", workflow, *pack, "--set", "oops"]) == 2
    assert main(["run", workflow, *pack, "--bogus"]) == 2
    assert main([]) == 2
    assert main(["run", str(tmp_path / "missing.json"), *pack]) == 1
    assert main(["run", workflow, *pack, "--video", "x.mp4"]) == 1  # no Load Video node here
    assert "VE_LoadVideo" in capsys.readouterr().err
    assert main(["run", workflow, "--nodes", "no_such_pack_module"]) == 1


def test_cli_lists_nodes(pack, capsys):
    assert main(["nodes", *pack]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Combine\tCombine Numbers" in lines and len(lines) == len(NODES)


def test_headless_imports_neither_torch_nor_comfyui():
    # Load the package from its folder without the pack's root __init__ (which may import nodes).
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, types\n"
        f"pack = types.ModuleType('comfyui_video_edit'); pack.__path__ = [{str(root)!r}]\n"
        "sys.modules['comfyui_video_edit'] = pack\n"
        "import comfyui_video_edit.headless.cli\n"
        "bad = [m for m in ('torch', 'comfy', 'folder_paths') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
