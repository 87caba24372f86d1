"""A small ComfyUI-compatible executor for API prompts over a node-class mapping.

It mirrors what ComfyUI does with `POST /prompt` (validation, then running the nodes that output
nodes need, in dependency order) with these differences: nothing is cached between calls, every
input is evaluated eagerly (lazy inputs included), and list mapping (INPUT_IS_LIST /
OUTPUT_IS_LIST) and node expansion are refused with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable

from .links import is_link

PRIMITIVE_CASTS = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
HIDDEN_NONE = frozenset({"EXTRA_PNGINFO", "DYNPROMPT", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG"})
MAX_LISTED_CHOICES = 8


@dataclass(frozen=True)
class ValidationError:
    """One problem in a prompt, named after ComfyUI's error types (`value_not_in_list`, ...)."""

    node_id: str | None
    class_type: str | None
    input_name: str | None
    message: str
    kind: str = "invalid_prompt"

    def __str__(self) -> str:
        where = []
        if self.node_id is not None:
            where.append(f"node {self.node_id}" + (f" ({self.class_type})" if self.class_type else ""))
        if self.input_name is not None:
            where.append(f"input '{self.input_name}'")
        return (", ".join(where) + ": " if where else "") + self.message


class WorkflowError(Exception):
    """The workflow cannot run as given; `errors` lists every validation problem found."""

    def __init__(self, message: str, errors: Iterable[ValidationError] = ()):
        super().__init__(message)
        self.errors = list(errors)


class NodeExecutionError(RuntimeError):
    """A node raised while running; the original exception is `__cause__`."""

    def __init__(self, node_id: str, class_type: str, title: str, original: BaseException):
        named = f"node {node_id}" + (f" '{title}'" if title and title != class_type else "")
        super().__init__(f"{named} ({class_type}) failed: {type(original).__name__}: {original}")
        self.node_id, self.class_type, self.title = node_id, class_type, title


@dataclass
class RunResult:
    outputs: dict[str, tuple] = field(default_factory=dict)  # node id -> its result tuple
    ui: dict[str, dict] = field(default_factory=dict)  # node id -> the "ui" dict it returned
    order: list[str] = field(default_factory=list)  # node ids in the order they ran


# --- prompt structure ----------------------------------------------------------------------


def _input_specs(cls: type) -> tuple[dict, dict, dict]:
    types = cls.INPUT_TYPES()
    return types.get("required") or {}, types.get("optional") or {}, types.get("hidden") or {}


def _spec_parts(spec: Any) -> tuple[Any, dict]:
    input_type = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return input_type, options


def _title(prompt: dict, node_id: str) -> str:
    entry = prompt.get(node_id) or {}
    return (entry.get("_meta") or {}).get("title") or entry.get("class_type") or ""


def _upstream_ids(entry: dict) -> list[str]:
    return [str(v[0]) for v in (entry.get("inputs") or {}).values() if is_link(v) and len(v) == 2]


def output_node_ids(prompt: dict, class_mappings: dict) -> list[str]:
    """Nodes whose class has OUTPUT_NODE True, in prompt order."""
    return [
        node_id for node_id, entry in prompt.items()
        if getattr(class_mappings.get(entry.get("class_type")), "OUTPUT_NODE", False) is True
    ]


def execution_order(prompt: dict, targets: Iterable[str]) -> list[str]:
    """Dependencies first, each node once, only nodes the targets need."""
    order: list[str] = []
    state: dict[str, str] = {}  # "open" while on the stack, "done" after

    def visit(node_id: str, path: list[str]) -> None:
        if state.get(node_id) == "done" or node_id not in prompt:
            return
        if state.get(node_id) == "open":
            loop = " -> ".join(path[path.index(node_id):] + [node_id])
            raise WorkflowError(f"the workflow has a dependency cycle ({loop}): remove one of these links")
        state[node_id] = "open"
        for upstream in _upstream_ids(prompt[node_id]):
            visit(upstream, path + [node_id])
        state[node_id] = "done"
        order.append(node_id)

    for target in targets:
        visit(str(target), [])
    return order


# --- validation ----------------------------------------------------------------------------


def types_match(received: Any, expected: Any) -> bool:
    """ComfyUI's link rule: equal, '*' on either side, or comma lists that share a type."""
    if received == expected or received == "*" or expected == "*":
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def _validate_function(cls: type) -> tuple[Any, set[str], bool]:
    """VALIDATE_INPUTS, the argument names it takes, and whether it takes **kwargs."""
    function = getattr(cls, "VALIDATE_INPUTS", None)
    if function is None:
        return None, set(), False
    parameters = inspect.signature(function).parameters.values()
    names = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return function, names, any(p.kind == p.VAR_KEYWORD for p in parameters)


def _choices_text(choices: list) -> str:
    shown = ", ".join(repr(c) for c in choices[:MAX_LISTED_CHOICES])
    more = f" (and {len(choices) - MAX_LISTED_CHOICES} more)" if len(choices) > MAX_LISTED_CHOICES else ""
    return shown + more if choices else "(the list is empty: add the files it lists)"


def convert_constant(value: Any, input_type: Any) -> Any:
    """Unwrap `{"__value__": ...}` and cast widget values as ComfyUI does (may raise).

    A number given to a combo of strings (`--set 1.multiple_of=64`, read as JSON) becomes the string it
    spells when that is a choice: ComfyUI's frontend always sends the choice's own string.
    """
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    if isinstance(input_type, (list, tuple)):
        if value not in input_type and not isinstance(value, str) and str(value) in input_type:
            return str(value)
        return value
    cast = PRIMITIVE_CASTS.get(input_type) if isinstance(input_type, str) else None
    return cast(value) if cast else value


def _output_types(class_mappings: dict) -> set[str]:
    """Every type some node of the mapping outputs: inputs of these types travel by link only."""
    found = set()
    for cls in class_mappings.values():
        for output in getattr(cls, "RETURN_TYPES", ()) or ():
            if isinstance(output, str):
                found.update(t.strip() for t in output.split(","))
    return found


def _socket_only(input_type: Any, output_types: set[str]) -> bool:
    """An input that takes a link and never a value: a data type (VE_MODEL, IMAGE, ...) that nodes output.

    Widget types that no node outputs (core's WEBCAM, AUDIO_RECORD) do take values, so they are left alone.
    """
    if not isinstance(input_type, str) or input_type in PRIMITIVE_CASTS or input_type in ("COMBO", "*", ""):
        return False
    return any(t.strip() in output_types for t in input_type.split(","))


def _check_link(prompt, class_mappings, node_id, class_type, name, value, expected, check_type):
    """A problem with a linked input, or None. Also returns the type it receives."""
    def error(message: str, kind: str = "bad_linked_input"):
        return ValidationError(node_id, class_type, name, message, kind), None

    if len(value) != 2 or not isinstance(value[1], int):
        return error(f"bad link {value!r}: a link is [node_id, output_index]; reconnect the input")
    source_id, slot = str(value[0]), value[1]
    source = prompt.get(source_id)
    if source is None:
        return error(f"is linked to node {source_id}, which is not in the workflow: reconnect the input")
    source_cls = class_mappings.get(source.get("class_type"))
    if source_cls is None:
        return None, None  # reported as an unknown node type
    outputs = tuple(getattr(source_cls, "RETURN_TYPES", ()))
    if not 0 <= slot < len(outputs):
        return error(
            f"is linked to output {slot} of node {source_id} ({source['class_type']}), which has "
            f"{len(outputs)} output(s): reconnect the input"
        )
    received = outputs[slot]
    if check_type and not types_match(received, expected):
        return error(
            f"expects {expected} but is linked to output {slot} of node {source_id} "
            f"({source['class_type']}), which gives {received}: connect an output of type {expected}",
            "return_type_mismatch",
        )
    return None, received


def _check_constant(node_id, class_type, name, value, input_type, options, builtin_checks):
    """(converted value, problems) for a constant input."""
    error = partial(ValidationError, node_id, class_type, name)
    expected = {"INT": "a whole number", "FLOAT": "a number", "STRING": "text", "BOOLEAN": "true or false"}
    try:
        value = convert_constant(value, input_type)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        return value, [error(f"{value!r} is not a valid {input_type}: give {expected[input_type]}",
                             "invalid_input_type")]
    if input_type == "FLOAT" and not math.isfinite(value):
        # ComfyUI lets NaN through (every comparison with NaN is False, so min/max never fire) and inf wherever
        # there is no max; a NaN cfg then samples an all-black video. Refused whether or not the node checks itself.
        return value, [error(f"{value} is not a finite number: give {expected[input_type]}"
                             + (f" between {options['min']} and {options['max']}"
                                if "min" in options and "max" in options else ""),
                             "invalid_input_type")]
    if not builtin_checks:
        return value, []
    problems = []
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if numeric and "min" in options and value < options["min"]:
        problems.append(error(f"{value} is below its minimum {options['min']}: use a value >= {options['min']}",
                              "value_smaller_than_min"))
    if numeric and "max" in options and value > options["max"]:
        problems.append(error(f"{value} is above its maximum {options['max']}: use a value <= {options['max']}",
                              "value_bigger_than_max"))
    if isinstance(input_type, (list, tuple)) and value not in input_type:
        problems.append(error(f"{value!r} is not one of its choices: use one of {_choices_text(list(input_type))}",
                              "value_not_in_list"))
    return value, problems


def _run_validate_inputs(cls, names, takes_kwargs, constants, received, node_id, class_type):
    """Call the class's VALIDATE_INPUTS with the inputs it names; a string reply is a problem."""
    arguments = {k: v for k, v in constants.items() if takes_kwargs or k in names}
    if "input_types" in names:
        arguments["input_types"] = received
    try:
        reply = getattr(cls(), "VALIDATE_INPUTS")(**arguments)
    except Exception as exc:  # the node's own check crashed: report it, don't stop validating
        return [ValidationError(node_id, class_type, None, f"its input check raised {type(exc).__name__}: {exc}",
                                "exception_during_validation")]
    if reply is True:
        return []
    message = reply if isinstance(reply, str) and reply else "its input check failed: review its inputs"
    return [ValidationError(node_id, class_type, None, message, "custom_validation_failed")]


def _unsupported_features(cls, node_id, class_type) -> list[ValidationError]:
    if getattr(cls, "INPUT_IS_LIST", False) or any(getattr(cls, "OUTPUT_IS_LIST", ()) or ()):
        return [ValidationError(
            node_id, class_type, None,
            "uses list inputs/outputs (INPUT_IS_LIST/OUTPUT_IS_LIST), which the headless runner does "
            "not support: run this workflow in ComfyUI", "unsupported_node")]
    return []


def _takes_extra_keywords(cls: type) -> bool:
    function = getattr(cls, getattr(cls, "FUNCTION", ""), None)
    if function is None:
        return False
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True  # cannot tell: let the call decide
    return any(p.kind == p.VAR_KEYWORD for p in parameters)


def _undeclared_links(cls, node_id, class_type, inputs, declared) -> list[ValidationError]:
    """ComfyUI passes linked inputs even when undeclared; a FUNCTION without **kwargs then crashes."""
    extra = [name for name, value in inputs.items() if is_link(value) and name not in declared]
    if not extra or _takes_extra_keywords(cls):
        return []
    names = ", ".join([*declared]) or "none"
    return [ValidationError(node_id, class_type, name,
                            f"is linked, but {class_type} has no such input (its inputs: {names}): "
                            "remove the link or connect it to one of those inputs", "bad_linked_input")
            for name in extra]


def validate_node(prompt: dict, node_id: str, class_mappings: dict) -> list[ValidationError]:
    """ComfyUI's per-node input checks, for one node of a prompt."""
    entry = prompt[node_id]
    class_type = entry["class_type"]
    cls = class_mappings[class_type]
    inputs = entry.get("inputs") or {}
    required, optional, _ = _input_specs(cls)
    function, names, takes_kwargs = _validate_function(cls)

    problems = _unsupported_features(cls, node_id, class_type)
    problems += _undeclared_links(cls, node_id, class_type, inputs, {**required, **optional})
    constants: dict[str, Any] = {}
    received: dict[str, Any] = {}
    output_types = _output_types(class_mappings)
    for section, specs in (("required", required), ("optional", optional)):
        for name, spec in specs.items():
            if name not in inputs:
                if section == "required":
                    problems.append(ValidationError(
                        node_id, class_type, name, "required input is missing: connect it or give it a value",
                        "required_input_missing"))
                continue
            input_type, options = _spec_parts(spec)
            value = inputs[name]
            if is_link(value):
                problem, received_type = _check_link(
                    prompt, class_mappings, node_id, class_type, name, value, input_type,
                    check_type="input_types" not in names)
                problems += [problem] if problem else []
                received[name] = received_type
                constants[name] = None  # like ComfyUI, checks see linked inputs as None
                continue
            if _socket_only(input_type, output_types):
                if value is None and section == "optional":
                    constants[name] = None  # an explicit null reads as "not connected", as in ComfyUI
                    continue
                problems.append(ValidationError(
                    node_id, class_type, name,
                    f"needs a link from a {input_type} output, not a value ({value!r}): connect a node's "
                    f"{input_type} output to it", "invalid_input_type"))
                continue
            builtin_checks = not takes_kwargs and name not in names
            constants[name], found = _check_constant(
                node_id, class_type, name, value, input_type, options, builtin_checks)
            problems += found
    unusable = any(p.kind in ("required_input_missing", "invalid_input_type") for p in problems)
    if function is not None and not unusable:
        problems += _run_validate_inputs(cls, names, takes_kwargs, constants, received, node_id, class_type)
    return problems


def _structure_problems(prompt: Any, class_mappings: dict) -> list[ValidationError]:
    if not isinstance(prompt, dict) or not prompt:
        return [ValidationError(None, None, None, "the prompt is empty or not a JSON object of nodes",
                                "invalid_prompt")]
    problems = []
    for node_id, entry in prompt.items():
        if not isinstance(entry, dict) or "class_type" not in entry:
            problems.append(ValidationError(str(node_id), None, None,
                                            "has no 'class_type': each node needs {'class_type', 'inputs'}"))
        elif entry["class_type"] not in class_mappings:
            problems.append(ValidationError(
                str(node_id), entry["class_type"], None,
                f"unknown node type '{entry['class_type']}': install the node pack that provides it, "
                "or remove the node", "invalid_prompt"))
        elif not isinstance(entry.get("inputs", {}), dict):
            problems.append(ValidationError(str(node_id), entry["class_type"], None,
                                            "'inputs' must be an object of input name -> value"))
    return problems


def _targets(prompt: dict, class_mappings: dict, outputs: Iterable[str] | None) -> list[str]:
    if outputs is None:
        return output_node_ids(prompt, class_mappings)
    return [str(o) for o in outputs]


def validate(prompt: dict, class_mappings: dict, outputs: Iterable[str] | None = None) -> list[ValidationError]:
    """Every problem that would stop the prompt, checked over the nodes the outputs need."""
    problems = _structure_problems(prompt, class_mappings)
    if problems:
        return problems
    targets = _targets(prompt, class_mappings, outputs)
    missing = [t for t in targets if t not in prompt]
    if missing:
        return [ValidationError(t, None, None, "is not a node of this workflow: pick an existing node id")
                for t in missing]
    if not targets:
        return [ValidationError(None, None, None, "the workflow has no output node: add a save or preview node",
                                "prompt_no_outputs")]
    try:
        order = execution_order(prompt, targets)
    except WorkflowError as exc:
        return [ValidationError(None, None, None, str(exc), "dependency_cycle")]
    for node_id in order:
        problems += validate_node(prompt, node_id, class_mappings)
    return problems


def _raise_if_invalid(problems: list[ValidationError]) -> None:
    if len(problems) == 1:  # the usual case: one line that names the node, the input and the fix
        raise WorkflowError(f"the workflow is not valid: {problems[0]}", problems)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise WorkflowError(f"the workflow is not valid ({len(problems)} problems):\n{lines}", problems)


# --- running -------------------------------------------------------------------------------


def _inference_mode():
    try:
        import torch  # lazily: the runner itself needs no torch
    except ImportError:
        return contextlib.nullcontext()
    return torch.inference_mode()


def _call_arguments(prompt: dict, node_id: str, cls: type, results: dict, extra_pnginfo: Any) -> dict:
    """Keyword arguments for one node: constants cast, links from upstream results, hidden values."""
    required, optional, hidden = _input_specs(cls)
    declared = {**required, **optional}
    arguments = {}
    for name, value in (prompt[node_id].get("inputs") or {}).items():
        if is_link(value):
            arguments[name] = results[str(value[0])][value[1]]
        elif name in declared:
            arguments[name] = convert_constant(value, _spec_parts(declared[name])[0])
    for name, kind in hidden.items():
        kind = kind if isinstance(kind, str) else kind[0]
        if kind == "UNIQUE_ID":
            arguments[name] = node_id
        elif kind == "PROMPT":
            arguments[name] = prompt
        elif kind == "EXTRA_PNGINFO":
            arguments[name] = extra_pnginfo
        elif kind in HIDDEN_NONE:
            arguments[name] = None
    return arguments


def _split_return(value: Any) -> tuple[tuple, dict | None]:
    """A node returns a tuple, or {"result": tuple, "ui": dict}."""
    ui = None
    if isinstance(value, dict):
        if "expand" in value:
            raise NotImplementedError("node expansion is not supported by the headless runner")
        ui = value.get("ui")
        value = value.get("result", ())
    if value is None:
        value = ()
    return (tuple(value) if isinstance(value, (tuple, list)) else (value,)), ui


def _run_node(prompt: dict, node_id: str, class_mappings: dict, results: dict, extra_pnginfo: Any):
    class_type = prompt[node_id]["class_type"]
    cls = class_mappings[class_type]
    try:
        arguments = _call_arguments(prompt, node_id, cls, results, extra_pnginfo)
        value = getattr(cls(), cls.FUNCTION)(**arguments)
        if inspect.isawaitable(value):
            value = asyncio.run(_awaited(value))
        return _split_return(value)
    except Exception as exc:
        raise NodeExecutionError(node_id, class_type, _title(prompt, node_id), exc) from exc


def _check_result_length(prompt: dict, node_id: str, class_mappings: dict, values: tuple) -> None:
    """A node that returns fewer values than it declares would break its consumers obscurely."""
    class_type = prompt[node_id]["class_type"]
    declared = len(getattr(class_mappings[class_type], "RETURN_TYPES", ()))
    if len(values) < declared:
        problem = ValueError(f"returned {len(values)} value(s) but declares {declared} output(s) in RETURN_TYPES")
        raise NodeExecutionError(node_id, class_type, _title(prompt, node_id), problem) from problem


async def _awaited(awaitable):
    return await awaitable


def execute(prompt: dict, class_mappings: dict, outputs: Iterable[str] | None = None,
            extra_pnginfo: Any = None) -> RunResult:
    """Validate, then run the nodes the output nodes (or `outputs`) need, each once."""
    _raise_if_invalid(validate(prompt, class_mappings, outputs))
    prompt = copy.deepcopy(prompt)  # hidden PROMPT inputs get a copy nodes cannot spoil ours through
    result = RunResult()
    with _inference_mode():
        for node_id in execution_order(prompt, _targets(prompt, class_mappings, outputs)):
            values, ui = _run_node(prompt, node_id, class_mappings, result.outputs, extra_pnginfo)
            _check_result_length(prompt, node_id, class_mappings, values)
            result.outputs[node_id] = values
            result.order.append(node_id)
            if ui is not None:
                result.ui[node_id] = ui
    return result


# --- overrides -----------------------------------------------------------------------------


class OverrideSyntaxError(ValueError):
    """A `--set` argument that is not `NODE_ID.input=value`."""


def parse_override(text: str) -> tuple[str, str, Any]:
    """`NODE_ID.input=value` -> (node id, input, value); the value is JSON if it parses."""
    key, equals, raw = text.partition("=")
    node_id, dot, name = key.partition(".")
    if not equals or not dot or not node_id or not name:
        raise OverrideSyntaxError(f"bad override {text!r}: write NODE_ID.input=value, e.g. 12.steps=30")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node_id.strip(), name.strip(), value


def apply_overrides(prompt: dict, sets: Iterable[str], class_mappings: dict | None = None) -> dict:
    """A copy of `prompt` with each `NODE_ID.input=value` applied (the input is replaced)."""
    updated = copy.deepcopy(prompt)
    for text in sets:
        node_id, name, value = parse_override(text)
        entry = updated.get(node_id)
        if entry is None:
            known = ", ".join(sorted(updated, key=str))
            raise WorkflowError(f"--set {text}: there is no node {node_id} in the workflow (its nodes: {known})")
        cls = (class_mappings or {}).get(entry.get("class_type"))
        if cls is not None:
            required, optional, _ = _input_specs(cls)
            if name not in required and name not in optional:
                names = ", ".join([*required, *optional])
                raise WorkflowError(
                    f"--set {text}: node {node_id} ({entry['class_type']}) has no input '{name}' "
                    f"(its inputs: {names})")
        entry.setdefault("inputs", {})[name] = value
    return updated
