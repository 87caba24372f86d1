"""Each shipped workflow's method does what it is there for: the graph is run headless at quick settings with
and without the node or setting that provides its mechanism, and the sampler's outputs must differ by a
measured amount and show the property the method promises (methods.md §6).

Nodes are found by what they return (RETURN_TYPES) or by input names, never by class name, so a workflow may
swap one injector node for another. Every file in workflows/ needs an entry in MECHANISMS.

Figures measured on builtin:tiny at these settings (4 frames of 128x96, 4 steps) are quoted next to each
floor; the floors sit well under them.
"""

import json
from pathlib import Path

import pytest
import torch

from comfyui_video_edit.headless import execute, object_info, ui_to_api
from comfyui_video_edit.headless.links import is_link
from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
INFO = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
FRAMES, STEPS, WIDTH, HEIGHT = 4, 4, 128, 96


# --- the graph ---------------------------------------------------------------------------------------------

def workflow_prompt(path: Path) -> dict:
    return ui_to_api(json.loads(path.read_text()), INFO)


def copied(prompt: dict) -> dict:
    return json.loads(json.dumps(prompt))


def node_class(prompt: dict, node_id: str):
    return NODE_CLASS_MAPPINGS[prompt[node_id]["class_type"]]


def link_type(prompt: dict, link: list) -> str:
    return node_class(prompt, link[0]).RETURN_TYPES[link[1]]


def quick(prompt: dict) -> dict:
    """Fewer frames, smaller frames, fewer steps; the graph itself is unchanged (inversion and sampler keep
    the same step count, as they must)."""
    out = copied(prompt)
    for node in out.values():
        inputs = node["inputs"]
        if "frame_cap" in inputs:  # the video loaders
            inputs.update(frame_cap=FRAMES, width=WIDTH, height=HEIGHT)
        if "steps" in inputs:
            inputs["steps"] = STEPS
        if "n_max" in inputs:  # FlowEdit runs the last n_max of the sampler's steps
            inputs["n_max"] = min(inputs["n_max"], STEPS)
    return out


def sampler_id(prompt: dict) -> str:
    found = [k for k, v in prompt.items()
             if "LATENT" in node_class(prompt, k).RETURN_TYPES and {"attention", "steps"} <= set(v["inputs"])]
    assert len(found) == 1, f"expected one sampler (LATENT output, attention and steps inputs), found {found}"
    return found[0]


def provider(prompt: dict, node_id: str, socket_type: str) -> str:
    """The node feeding `node_id` through an input of `socket_type`."""
    links = [v for v in prompt[node_id]["inputs"].values() if is_link(v) and link_type(prompt, v) == socket_type]
    assert len(links) == 1, f"node {node_id}: expected one {socket_type} input link, found {links}"
    return links[0][0]


def unlinked(prompt: dict, socket_type: str) -> dict:
    """The graph with the sampler's input of `socket_type` disconnected."""
    out = copied(prompt)
    inputs = out[sampler_id(out)]["inputs"]
    names = [n for n, v in inputs.items() if is_link(v) and link_type(out, v) == socket_type]
    assert names, f"the sampler has no {socket_type} input to disconnect"
    for name in names:
        del inputs[name]
    return out


def with_inputs(prompt: dict, node_id: str, **values) -> dict:
    out = copied(prompt)
    missing = set(values) - set(out[node_id]["inputs"])
    assert not missing, f"node {node_id} ({out[node_id]['class_type']}) has no input {sorted(missing)}"
    out[node_id]["inputs"].update(values)
    return out


def generating(prompt: dict, like: torch.Tensor) -> dict:
    """Size the sampler's own generation like `like` (latents), for graphs that lose their images or hints."""
    frames, _, h, w = like.shape
    return with_inputs(prompt, sampler_id(prompt), frame_count=frames, width=w * 8, height=h * 8)


def run(prompt: dict):
    """Run what the sampler needs; its latents (ComfyUI convention) and the whole result."""
    sampler = sampler_id(prompt)
    result = execute(prompt, NODE_CLASS_MAPPINGS, outputs=[sampler])
    return result.outputs[sampler][1]["samples"], result


def latents(prompt: dict) -> torch.Tensor:
    return run(prompt)[0]


# --- measures ----------------------------------------------------------------------------------------------

def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def per_frame(a: torch.Tensor, b: torch.Tensor) -> list:
    return [float((a[k] - b[k]).abs().mean()) for k in range(a.shape[0])]


def neighbour_gap(x: torch.Tensor) -> float:
    """Mean |frame k+1 - frame k|: lower = consecutive frames closer."""
    return float((x[1:] - x[:-1]).abs().mean())


def fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def differs(name: str, with_it: torch.Tensor, without: torch.Tensor, floor: float) -> float:
    effect = mad(with_it, without)
    print(f"\n{name}: mean |diff| {effect:.4g} (per frame {fmt(per_frame(with_it, without))})")
    assert effect > floor, f"{name}: the sampler's latents moved by {effect:.3g} (mean abs), want > {floor:g}"
    return effect


def first_frame_alone(name: str, with_it: torch.Tensor, without: torch.Tensor, floor: float, rounding=1e-3):
    """A causal mechanism leaves frame 0 as it is (up to float rounding) and moves the later frames."""
    frames = per_frame(with_it, without)
    kept = float((with_it[0] - without[0]).abs().max())
    print(f"\n{name}: frame 0 max |diff| {kept:.3g}, per frame mean {fmt(frames)}")
    assert kept <= rounding, f"{name}: frame 0 moved by {kept:.3g} (max abs), want <= {rounding:g}"
    assert min(frames[1:]) > floor, f"{name}: later frames moved by {fmt(frames[1:])}, want each > {floor:g}"


# --- one check per workflow --------------------------------------------------------------------------------

def check_sdedit_crossframe(prompt):
    sampler = sampler_id(prompt)
    edited, result = run(prompt)
    # cross-frame attention (first+previous): measured 0.13 overall, frames 1-3 0.13-0.23, frame 0 ~1e-5
    plain = latents(with_inputs(prompt, sampler, attention="none"))
    differs("sdedit: attention -> none", edited, plain, 1e-2)
    first_frame_alone("sdedit: attention -> none", edited, plain, 1e-2)
    # SDEdit keeps the source: the edit lies nearer the clip's latents than a generation from noise (4.2 vs 22.7)
    from comfyui_video_edit.pipelines_core.models.model import encode_frames

    model = result.outputs[provider(prompt, sampler, "VE_MODEL")][0]
    frames = result.outputs[provider(prompt, sampler, "IMAGE")][0]
    with torch.inference_mode():
        source = encode_frames(model, frames) / model.vae_scale
    generated = latents(generating(unlinked(prompt, "IMAGE"), edited))
    near, far = mad(edited, source), mad(generated, source)
    print(f"\nsdedit: distance to the source latents {near:.3g}, generation from noise {far:.3g}")
    assert near < 0.5 * far, f"SDEdit output is {near:.3g} from the source, generation {far:.3g}"
    return result


def check_edit_a_video_edit(prompt):
    """Edit-A-Video: tuning, attention control, and sparse-causal blending. On builtin:tiny's flat attention every
    blend mask at the workflow's 0.3 covers the whole frame, so the union changes nothing there; the source words'
    masks at 0.98 differ from frame to frame. Own-frame blending is the same graph with the injector's base class
    (FateZero's node: the same widgets)."""
    from comfyui_video_edit.pipelines_core.flow.estimate import estimate_flow
    from comfyui_video_edit.pipelines_core.flow.warp import warp_error

    prompt, sampler, tune = tuned_graph(prompt)
    injector, inverter = provider(prompt, sampler, "VE_INJECTION"), provider(prompt, sampler, "VE_INVERSION")
    assert provider(prompt, inverter, "VE_MODEL") == tune, "DDIM Invert must invert with the tuned model"
    edited, result = run(prompt)
    check_tuning("edit-a-video", prompt, tune, result)  # measured 1.1801 -> 1.1245
    differs("edit-a-video: attention control unlinked", edited, latents(unlinked(prompt, "VE_INJECTION")), 0.3)  # 2.99
    sharp = with_inputs(prompt, injector, blend_threshold=0.98, target_blend_words="")
    own = copied(sharp)
    base = node_class(prompt, injector).__bases__[0]
    own[injector]["class_type"] = next(k for k, c in NODE_CLASS_MAPPINGS.items() if c is base)
    joined, joined_result = run(sharp)
    alone, alone_result = run(own)
    # frame 0 keeps its own mask (measured max |diff| 0), frames 1-3 move (measured 2.82, 7.32, 5.09)
    first_frame_alone("edit-a-video: own-frame blend masks", joined, alone, 0.5)
    # steadier along the source clip's flow: measured warp error 0.0199 sparse-causal, 0.0220 own-frame masks
    flow = estimate_flow(joined_result.outputs[provider(prompt, inverter, "IMAGE")][0])
    steady = warp_error(joined_result.outputs[sampler][0], flow)
    flicker = warp_error(alone_result.outputs[sampler][0], flow)
    print(f"\nedit-a-video: warp error {steady:.4f} with sparse-causal blend masks, {flicker:.4f} with own-frame ones")
    assert steady < flicker, f"edit-a-video: warp error {steady:.4f} sparse-causal, {flicker:.4f} own-frame masks"


def check_flux_flowedit(prompt):
    """FlowEdit on Flux: the edit is the velocity difference of target and source prompts, so with the source
    prompt and guidance as the target's it vanishes (the output is the encoded clip); cross-frame attention acts
    causally in both velocity calls."""
    from comfyui_video_edit.pipelines_core.models.model import encode_frames

    sampler = sampler_id(prompt)
    edited, result = run(prompt)
    model = result.outputs[provider(prompt, sampler, "VE_MODEL")][0]
    assert model.backbone.name == "Flux", f"{model!r} is not a Flux model"
    flowedit = provider(prompt, sampler, "VE_INJECTION")
    target = prompt[sampler]["inputs"]
    same = latents(with_inputs(prompt, flowedit, source_prompt=target["prompt"], source_guidance=target["cfg"]))
    frames = result.outputs[provider(prompt, flowedit, "IMAGE")][0]
    with torch.inference_mode():
        source = model.unscaled(encode_frames(model, frames))
    kept = float((same - source).abs().max())
    print(f"\nflowedit: source prompt as target, max |output - clip| {kept:.2e}")
    assert kept < 1e-4, f"FlowEdit with the target as source moved the clip by {kept:.3g}"
    differs("flowedit: source prompt -> target", edited, same, 1e-3)
    plain = latents(with_inputs(prompt, sampler, attention="none"))
    first_frame_alone("flowedit: attention -> none", edited, plain, 1e-4)


def check_flux_rf_inversion_edit(prompt):
    """RF-Inversion on Flux: with eta 0 the edit is plain sampling from the inversion; the control (eta 0.9)
    pulls the output towards the clip; gamma pulls the inversion towards noise."""
    sampler = sampler_id(prompt)
    edited, result = run(prompt)
    control = provider(prompt, sampler, "VE_INJECTION")
    inverter = provider(prompt, control, "VE_INVERSION")
    inversion = result.outputs[inverter][0]
    clean = result.outputs[provider(prompt, sampler, "VE_MODEL")][0].unscaled(inversion.clean)
    free = latents(with_inputs(prompt, control, eta=0.0))
    differs("rf-inversion: eta -> 0", edited, free, 1e-3)
    near, far = mad(edited, clean), mad(free, clean)
    print(f"\nrf-inversion: distance to the clip {near:.3g} with the control, {far:.3g} without")
    assert near < far, f"the controlled edit is {near:.3g} from the clip, the free one {far:.3g}"
    differs("rf-inversion: gamma -> 0", edited, latents(with_inputs(prompt, inverter, gamma=0.0)), 1e-3)


def check_sdxl_sdedit_crossframe(prompt):
    """The same edit on an SDXL model: cross-frame attention and SDEdit work through the backbone seam."""
    result = check_sdedit_crossframe(prompt)
    model = result.outputs[provider(prompt, sampler_id(prompt), "VE_MODEL")][0]
    assert model.backbone.name == "SDXL" and model.text_encoder_2 is not None, f"{model!r} is not an SDXL model"


def check_lora_sdedit(prompt):
    sampler = sampler_id(prompt)
    lora = provider(prompt, sampler, "VE_MODEL")
    base = [v for v in prompt[lora]["inputs"].values() if is_link(v) and link_type(prompt, v) == "VE_MODEL"]
    assert len(base) == 1 and "strength" in prompt[lora]["inputs"], "the sampler's model is not a LoRA-like node"
    bypassed = copied(prompt)
    bypassed[sampler]["inputs"]["model"] = base[0]
    styled, without = latents(prompt), latents(bypassed)
    differs("lora: LoRA node bypassed", styled, without, 0.5)  # measured 6.1
    at_zero = latents(with_inputs(prompt, lora, strength=0.0))
    assert torch.equal(at_zero, without), f"LoRA at strength 0 moved the output by {mad(at_zero, without):.3g}"


def check_text2video_zero_edit(prompt):
    sampler = sampler_id(prompt)
    edited = latents(prompt)
    # attention "first": frames share frame 0's keys; the frames are near copies (shared noise), so the effect
    # is small: measured frames 1-3 ~5e-5 mean, 3e-4 max; frame 0 exactly unchanged. With identical frames
    # (no ControlNet) the two rules give exactly equal outputs, so any difference here is the rule's.
    plain = latents(with_inputs(prompt, sampler, attention="none"))
    first_frame_alone("t2v-zero: attention -> none", edited, plain, 5e-6, rounding=1e-6)
    # the ControlNet gives each frame its structure (measured 4.7); without it shared noise makes the frames
    # identical, with it they differ (neighbour gap measured 6e-4)
    uncontrolled = latents(generating(unlinked(prompt, "VE_CONTROL"), edited))
    differs("t2v-zero: ControlNet disconnected", edited, uncontrolled, 0.5)
    assert torch.equal(uncontrolled, uncontrolled[:1].expand_as(uncontrolled)), "shared noise: identical frames"
    assert neighbour_gap(edited) > 1e-5, f"the hints do not tell frames apart: gap {neighbour_gap(edited):.3g}"
    neither = latents(generating(with_inputs(unlinked(prompt, "VE_CONTROL"), sampler, attention="none"), edited))
    differs("t2v-zero: attention none and no ControlNet", edited, neither, 0.5)  # measured 4.7
    # shared initial noise: per-frame noise pulls the frames apart (measured 22 overall, gap 29 vs 6e-4)
    independent = latents(with_inputs(prompt, sampler, noise="per_frame"))
    differs("t2v-zero: noise -> per_frame", edited, independent, 1.0)
    assert neighbour_gap(edited) < 0.01 * neighbour_gap(independent), (
        f"shared noise: neighbour gap {neighbour_gap(edited):.3g} vs per-frame {neighbour_gap(independent):.3g}")


def check_controlvideo_edit(prompt):
    sampler = sampler_id(prompt)
    edited = latents(prompt)
    # the interleaved smoother replaces interior frames (odd, then even) and keeps both ends: measured 26 on
    # frames 1-2, 0.0018 on frames 0 and 3 (the ends move only through the all-frames attention)
    unsmoothed = latents(unlinked(prompt, "VE_TEMPORAL"))
    differs("controlvideo: Temporal Guidance disconnected", edited, unsmoothed, 1.0)  # measured 13
    frames = per_frame(edited, unsmoothed)
    assert min(frames[1:-1]) > 100 * max(frames[0], frames[-1]), f"smoother: interior vs ends {fmt(frames)}"
    # fully cross-frame attention (measured 0.054)
    differs("controlvideo: attention all -> none", edited, latents(with_inputs(prompt, sampler, attention="none")),
            5e-3)


def check_rave_edit(prompt):
    sampler = sampler_id(prompt)
    injector = provider(prompt, sampler, "VE_INJECTION")
    edited = latents(prompt)
    # the shuffled grids: the same graph without RAVE (per-frame attention none, same inversion start) differs
    # (measured 8.0, frames 7.8-9.0)
    plain = latents(unlinked(prompt, "VE_INJECTION"))
    differs("rave: injection disconnected", edited, plain, 0.5)
    # 1x1 grids: each frame alone, so shuffling and unshuffling is exactly the plain sampler (measured 0.0)
    single = latents(with_inputs(prompt, injector, grid_size=1))
    assert (single - plain).abs().max() <= 1e-5, f"rave: 1x1 grids moved the edit by {mad(single, plain):.3g}"
    # the shuffle: fixed grids of consecutive frames differ (measured 6.8), and from the same inversion the seed
    # acts through the permutation only (measured 6.1 with RAVE, exactly 0 without)
    differs("rave: shuffle off", edited, latents(with_inputs(prompt, injector, shuffle=False)), 0.5)
    differs("rave: seed 42 -> 43", edited, latents(with_inputs(prompt, sampler, seed=43)), 0.5)
    assert torch.equal(plain, latents(with_inputs(unlinked(prompt, "VE_INJECTION"), sampler, seed=43)))


def check_rerender_edit(prompt):
    from comfyui_video_edit.pipelines_core.flow.warp import warp_error

    sampler = sampler_id(prompt)
    edited, result = run(prompt)
    plain, plain_result = run(unlinked(prompt, "VE_TEMPORAL"))
    differs("rerender: Temporal Guidance disconnected", edited, plain, 0.5)  # measured 6.6
    first_frame_alone("rerender: Temporal Guidance disconnected", edited, plain, 0.5)  # frames 1-3: 8.5-9.2
    # steadier along the source clip's flow (measured warp error 0.0312 vs 0.0356; x0 warp and pixel fusion
    # act at 4 steps, AdaIN's window (0.8, 1) does not: see test_temporal_recipes for each factor alone)
    flow = result.outputs[provider(prompt, provider(prompt, sampler, "VE_TEMPORAL"), "VE_FLOW")][0]
    guided, unguided = warp_error(result.outputs[sampler][0], flow), warp_error(plain_result.outputs[sampler][0], flow)
    print(f"\nrerender: warp error {guided:.4f} with Temporal Guidance, {unguided:.4f} without")
    assert guided < unguided, f"rerender: warp error {guided:.4f} with Temporal Guidance, {unguided:.4f} without"


def check_pix2video_edit(prompt):
    sampler = sampler_id(prompt)
    injector = provider(prompt, sampler, "VE_INJECTION")
    edited = latents(prompt)
    differs("pix2video: injection disconnected", edited, latents(unlinked(prompt, "VE_INJECTION")), 1e-2)
    # x̂0 guidance toward the previous frame: weight 0 differs (measured 0.16, frames 1-3 0.2), frame 0 is never
    # moved, consecutive frames come closer (measured neighbour gap 9.08 vs 9.31)
    unguided = latents(with_inputs(prompt, injector, guidance_weight=0.0))
    differs("pix2video: guidance weight 0", edited, unguided, 1e-2)
    first_frame_alone("pix2video: guidance weight 0", edited, unguided, 1e-2)
    assert neighbour_gap(edited) < neighbour_gap(unguided), (
        f"guidance: neighbour gap {neighbour_gap(edited):.4g} vs {neighbour_gap(unguided):.4g} without")


def check_tokenflow_edit(prompt):
    edited = latents(prompt)
    plain = latents(unlinked(prompt, "VE_INJECTION"))
    differs("tokenflow: injection disconnected", edited, plain, 0.5)  # measured 5.6
    # keyframe propagation: consecutive frames closer (measured neighbour gap 7.77 vs 8.82)
    assert neighbour_gap(edited) < 0.97 * neighbour_gap(plain), (
        f"tokenflow: neighbour gap {neighbour_gap(edited):.4g} vs {neighbour_gap(plain):.4g} without")


def check_fatezero_edit(prompt):
    injector = provider(prompt, sampler_id(prompt), "VE_INJECTION")
    edited = latents(prompt)
    plain = latents(unlinked(prompt, "VE_INJECTION"))
    differs("fatezero: injection disconnected", edited, plain, 0.25)  # measured 2.65
    # attention fusion only inside its windows: both windows 0 is the graph without the injection (measured 0.0)
    closed = latents(with_inputs(prompt, injector, self_replace=0.0, cross_replace=0.0))
    assert (closed - plain).abs().max() <= 1e-5, f"fatezero with empty windows moved {mad(closed, plain):.3g}"


def check_fresco_edit(prompt):
    from comfyui_video_edit.pipelines_core.flow.warp import warp_error

    sampler = sampler_id(prompt)
    injector = provider(prompt, sampler, "VE_INJECTION")
    edited, result = run(prompt)
    plain, plain_result = run(unlinked(prompt, "VE_INJECTION"))
    differs("fresco: injection disconnected", edited, plain, 1.0)  # measured 4.92
    # each part moves the edit on its own (measured: spatial-guided attention off 2.25, efficient cross-frame
    # attention off 2.87, temporal-guided attention off 1.81, temporal loss off 4.45, spatial loss off 5.43)
    differs("fresco: cross_frame_attention off", edited,
            latents(with_inputs(prompt, injector, cross_frame_attention=False)), 0.5)
    differs("fresco: temporal_loss off", edited, latents(with_inputs(prompt, injector, temporal_loss=False)), 0.5)
    # along the source clip's flow: measured 0.0353 vs 0.0356 without the injection, a margin too thin on the random
    # tiny model to hold on every CPU, so it is printed, not asserted
    flow = result.outputs[provider(prompt, injector, "VE_FLOW")][0]
    guided, unguided = warp_error(result.outputs[sampler][0], flow), warp_error(plain_result.outputs[sampler][0], flow)
    print(f"\nfresco: warp error {guided:.4f} with the injection, {unguided:.4f} without")


def check_instruct_pix2pix_edit(prompt):
    sampler = sampler_id(prompt)
    edited = latents(prompt)
    # cross-frame attention (first, Text2Video-Zero's instruct-pix2pix video): measured 0.94 overall, frames 1-3
    # 1.64/1.18/0.94, frame 0 exactly 0 (it attends to itself under both rules)
    plain = latents(with_inputs(prompt, sampler, attention="none"))
    differs("instruct-pix2pix: attention -> none", edited, plain, 0.1)
    first_frame_alone("instruct-pix2pix: attention -> none", edited, plain, 0.1)
    # InstructPix2Pix's second guidance scale, on the source frames: image_guidance 1.5 -> 4 (measured 2.47)
    differs("instruct-pix2pix: image_guidance 1.5 -> 4", edited,
            latents(with_inputs(prompt, sampler, image_guidance=4.0)), 0.5)
    # the source frames condition every step (at strength 1 the start is the seed's noise alone): other frames of
    # the clip, another edit (measured 3.53, frames 3.32-3.93)
    loader = provider(prompt, sampler, "IMAGE")
    differs("instruct-pix2pix: source frames 4-7 instead of 0-3", edited,
            latents(with_inputs(prompt, loader, skip_first=4)), 0.5)


def check_long_clip_edit(prompt):
    sampler = sampler_id(prompt)
    streamed = latents(prompt)
    # the same graph on an IMAGE batch: the loader that returns frames instead of latents
    loader = provider(prompt, sampler, "LATENT")
    image_loaders = [name for name, cls in NODE_CLASS_MAPPINGS.items()
                     if cls.RETURN_TYPES[:1] == ("IMAGE",) and "frame_cap" in cls.INPUT_TYPES()["required"]]
    assert len(image_loaders) == 1, image_loaders
    in_memory = copied(prompt)
    accepted = NODE_CLASS_MAPPINGS[image_loaders[0]].INPUT_TYPES()
    names = set(accepted["required"]) | set(accepted.get("optional") or {})
    in_memory[loader] = {"class_type": image_loaders[0],
                         "inputs": {k: v for k, v in prompt[loader]["inputs"].items() if k in names}}
    del in_memory[sampler]["inputs"]["latent"]
    in_memory[sampler]["inputs"]["images"] = [loader, 0]
    from_images = latents(in_memory)
    assert torch.equal(streamed, from_images), f"streamed vs in-memory: {mad(streamed, from_images):.3g}"
    # cross-frame attention across the streamed clip (measured 0.13, frame 0 ~1e-5)
    plain = latents(with_inputs(prompt, sampler, attention="none"))
    differs("long clip: attention -> none", streamed, plain, 1e-2)
    first_frame_alone("long clip: attention -> none", streamed, plain, 1e-2)


def check_fairy_anchor_edit(prompt):
    sampler = sampler_id(prompt)
    injector = provider(prompt, sampler, "VE_INJECTION")
    edited = latents(prompt)
    # anchor attention (the sampler's own rule is none): measured 0.12 overall, per frame 0.089-0.16 (the anchors
    # move too: they attend to each other)
    plain = latents(unlinked(prompt, "VE_INJECTION"))
    differs("fairy: injection disconnected", edited, plain, 1e-2)
    assert min(per_frame(edited, plain)) > 1e-2, f"fairy: per-frame effect {fmt(per_frame(edited, plain))}"
    # given the anchors the other frames are independent: with 2 anchors (frames 0, 3) frames 1 and 2 in one
    # chunk or in two give the same clip (measured max |diff| 0)
    two = with_inputs(prompt, injector, anchors=2)
    together, apart = latents(with_inputs(two, sampler, chunk_size=2)), latents(with_inputs(two, sampler, chunk_size=1))
    gap = float((together - apart).abs().max())
    print(f"\nfairy: 2 anchors, chunk_size 2 vs 1: max |diff| {gap:.3g}")
    assert gap <= 1e-4, f"fairy: chunking moved the clip by {gap:.3g} (max abs)"
    # every frame an anchor is the dense all-frames rule (methods.md F4; measured max |diff| 0)
    frames = edited.shape[0]
    every = latents(with_inputs(prompt, injector, anchors=frames))
    dense = latents(with_inputs(unlinked(prompt, "VE_INJECTION"), sampler, attention="all", chunk_size=frames))
    gap = float((every - dense).abs().max())
    print(f"\nfairy: {frames} anchors vs attention all: max |diff| {gap:.3g}")
    assert gap <= 1e-4, f"fairy: all frames as anchors differ from all-frames attention by {gap:.3g}"


def check_flatten_edit(prompt):
    from comfyui_video_edit.pipelines_core.flow.warp import warp_error

    sampler = sampler_id(prompt)
    injector = provider(prompt, sampler, "VE_INJECTION")
    edited, result = run(prompt)
    plain, plain_result = run(unlinked(prompt, "VE_INJECTION"))
    differs("flatten: injection disconnected", edited, plain, 0.5)  # measured 8.36
    # attention along the flow's trajectories alone (measured 0.245; on the finest grid only, 0.126)
    differs("flatten: flow_layers -> none", edited, latents(with_inputs(prompt, injector, flow_layers="none")), 0.05)
    # the source's features and Q/K hold consecutive frames together (neighbour gap measured 6.95 vs 8.79) and
    # steadier along the source clip's flow (warp error measured 0.0162 vs 0.0201)
    assert neighbour_gap(edited) < 0.9 * neighbour_gap(plain), (
        f"flatten: neighbour gap {neighbour_gap(edited):.4g} vs {neighbour_gap(plain):.4g} without")
    flow = result.outputs[provider(prompt, injector, "VE_FLOW")][0]
    guided, unguided = warp_error(result.outputs[sampler][0], flow), warp_error(plain_result.outputs[sampler][0], flow)
    print(f"\nflatten: warp error {guided:.4f} with the injection, {unguided:.4f} without")
    assert guided < unguided, f"flatten: warp error {guided:.4f} with the injection, {unguided:.4f} without"


def check_vid2vid_zero_edit(prompt):
    sampler = sampler_id(prompt)
    injector, inverter = provider(prompt, sampler, "VE_INJECTION"), provider(prompt, sampler, "VE_INVERSION")
    edited, result = run(prompt)
    plain = latents(unlinked(prompt, "VE_INJECTION"))  # null-text sampling from x_T under the sampler's own rule
    differs("vid2vid-zero: injection disconnected", edited, plain, 0.3)  # measured 3.12
    # cross-attention guidance: the edit follows the source's maps for 0.8 of the steps (measured 1.27)
    differs("vid2vid-zero: cross_replace 0", edited, latents(with_inputs(prompt, injector, cross_replace=0.0)), 0.1)
    # null-text: with the source prompt as the edit prompt the clip comes back, closer with the tuned embeddings
    # on every step than with none (measured rms 2.457 vs 3.099)
    x0 = result.outputs[inverter][0].latents[0]
    same = copied(prompt)
    same[sampler]["inputs"]["prompt"] = prompt[inverter]["inputs"]["source_prompt"]
    scale = result.outputs[provider(prompt, sampler, "VE_MODEL")][0].vae.config.scaling_factor  # LATENT: unscaled
    tuned = latents(with_inputs(same, injector, null_uncond_ratio=1.0)) * scale
    untuned = latents(with_inputs(same, injector, null_uncond_ratio=0.0)) * scale
    err = lambda x: float((x - x0).pow(2).mean().sqrt())
    print(f"\nvid2vid-zero: source prompt, rms to the clip {err(tuned):.4g} with null-text, {err(untuned):.4g} without")
    assert err(tuned) < 0.9 * err(untuned)


def check_vidtome_edit(prompt):
    sampler = sampler_id(prompt)
    merger = provider(prompt, sampler, "VE_INJECTION")
    inner = provider(prompt, merger, "VE_INJECTION")
    edited = latents(prompt)
    # VidToMe bypassed: the sampler reads the Plug-and-Play injection directly (measured 0.75, frames 0.21-1.04)
    bypassed = copied(prompt)
    bypassed[sampler]["inputs"]["injection"] = [inner, 0]
    pnp_only = latents(bypassed)
    differs("vidtome: merging bypassed (Plug-and-Play alone)", edited, pnp_only, 0.1)
    # from an inversion the seed draws only VidToMe's chunks, destination frames and global sides: another seed
    # moves the edit (measured 0.52, frames 0.35-0.97) and leaves Plug-and-Play alone exactly as it was
    differs("vidtome: seed 42 -> 7", edited, latents(with_inputs(prompt, sampler, seed=7)), 0.1)
    assert torch.equal(pnp_only, latents(with_inputs(bypassed, sampler, seed=7))), "PnP alone depends on the seed"


def bypass(prompt: dict, node_id: str, socket_type: str) -> dict:
    """The graph with every use of `node_id`'s `socket_type` output fed by what feeds the node's own input of it."""
    upstream = next(v for v in prompt[node_id]["inputs"].values() if is_link(v) and link_type(prompt, v) == socket_type)
    output = [node_id, NODE_CLASS_MAPPINGS[prompt[node_id]["class_type"]].RETURN_TYPES.index(socket_type)]
    out = copied(prompt)
    for node in out.values():
        for name, value in node["inputs"].items():
            if is_link(value) and list(value) == output:
                node["inputs"][name] = list(upstream)
    return out


def tuned_graph(prompt: dict):
    """The tuning node feeding the sampler's model (found by its learning_rate input), at steps and a learning rate
    that move builtin:tiny's random weights (quick() leaves it 4 steps at the real models' 1e-4)."""
    sampler = sampler_id(prompt)
    tune = provider(prompt, sampler, "VE_MODEL")
    assert "learning_rate" in prompt[tune]["inputs"], "the sampler's model does not come from a tuning node"
    return with_inputs(prompt, tune, steps=20, learning_rate=1e-2), sampler, tune


def check_tuning(name: str, prompt: dict, tune: str, result) -> None:
    """The tuned model fits the clip: its denoising loss on the clip is lower than the base model's."""
    from comfyui_video_edit.pipelines_core.methods.tune_a_video import clip_loss

    base = provider(prompt, tune, "VE_MODEL")
    frames = result.outputs[provider(prompt, tune, "IMAGE")][0]
    text = prompt[tune]["inputs"]["prompt"]
    with torch.inference_mode():
        tuned, plain = clip_loss(result.outputs[tune][0], frames, text), clip_loss(result.outputs[base][0], frames, text)
    print(f"\n{name}: denoising loss on the clip {plain:.4f} (base) -> {tuned:.4f} (tuned)")
    # measured 1.1801 -> 1.1245
    assert tuned < 0.99 * plain, f"{name}: tuning left the loss on the clip at {tuned:.4g} (base {plain:.4g})"


def check_tune_a_video_edit(prompt):
    prompt, sampler, tune = tuned_graph(prompt)
    inverter = provider(prompt, sampler, "VE_INVERSION")
    assert provider(prompt, inverter, "VE_MODEL") == tune, "DDIM Invert must invert with the tuned model"
    edited, result = run(prompt)
    check_tuning("tune-a-video", prompt, tune, result)
    differs("tune-a-video: Tune on Clip bypassed", edited, latents(bypass(prompt, tune, "VE_MODEL")), 1.0)  # 11.6


def check_video_p2p_edit(prompt):
    prompt, sampler, tune = tuned_graph(prompt)
    inverter = provider(prompt, sampler, "VE_INVERSION")
    assert provider(prompt, inverter, "VE_MODEL") == tune and prompt[inverter]["inputs"]["null_text"]
    edited, result = run(prompt)
    check_tuning("video-p2p", prompt, tune, result)
    differs("video-p2p: attention control unlinked", edited, latents(unlinked(prompt, "VE_INJECTION")), 0.3)  # 3.0
    differs("video-p2p: Tune on Clip bypassed", edited, latents(bypass(prompt, tune, "VE_MODEL")), 1.0)  # 9.1


MECHANISMS = {
    "controlvideo_edit": check_controlvideo_edit,
    "fairy_anchor_edit": check_fairy_anchor_edit,
    "fatezero_edit": check_fatezero_edit,
    "flatten_edit": check_flatten_edit,
    "fresco_edit": check_fresco_edit,
    "instruct_pix2pix_edit": check_instruct_pix2pix_edit,
    "long_clip_edit": check_long_clip_edit,
    "lora_sdedit": check_lora_sdedit,
    "pix2video_edit": check_pix2video_edit,
    "rave_edit": check_rave_edit,
    "rerender_edit": check_rerender_edit,
    "sdedit_crossframe": check_sdedit_crossframe,
    "sdxl_sdedit_crossframe": check_sdxl_sdedit_crossframe,
    "edit_a_video_edit": check_edit_a_video_edit,
    "flux_flowedit": check_flux_flowedit,
    "flux_rf_inversion_edit": check_flux_rf_inversion_edit,
    "text2video_zero_edit": check_text2video_zero_edit,
    "tokenflow_edit": check_tokenflow_edit,
    "tune_a_video_edit": check_tune_a_video_edit,
    "vid2vid_zero_edit": check_vid2vid_zero_edit,
    "video_p2p_edit": check_video_p2p_edit,
    "vidtome_edit": check_vidtome_edit,
}


def test_every_workflow_has_a_mechanism_test():
    shipped = {p.stem for p in WORKFLOWS}
    missing, stale = sorted(shipped - set(MECHANISMS)), sorted(set(MECHANISMS) - shipped)
    assert not missing, f"workflows without a mechanism test (add to MECHANISMS in {Path(__file__).name}): {missing}"
    assert not stale, f"mechanism tests for workflows that are not shipped any more: {stale}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_mechanism_has_a_measured_effect(path):
    check = MECHANISMS.get(path.stem)
    if check is None:
        pytest.fail(f"workflows/{path.name} has no mechanism test: add one to MECHANISMS in {Path(__file__).name}")
    check(quick(workflow_prompt(path)))
