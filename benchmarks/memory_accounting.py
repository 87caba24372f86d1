"""What each recipe needs on a GPU for a long clip at 512x512 with SD-1.5 in fp16 -- computed, not measured.

No GPU and no SD-1.5 weights are needed: every recipe in workflows/ runs headless once on builtin:tiny over a
synthetic clip of --frames frames (small pixels, --steps steps), and every UNet and ControlNet call is recorded
with what decides its memory: its rows, its latent size (a RAVE grid holds n x n frames), its layout (roles x
frames, groups) and, per attention layer, the cross-frame rule and whether the call took the
explicit-probabilities path (an edit reading them). Chunking makes each call's size a function of chunk_size,
not of the clip, so the recorded calls are the long clip's calls.
Then each distinct call is counted at --size for SD-1.5's configs (shipped in pipelines_core/models/configs)
on fake tensors (torch's FakeTensorMode + MemTracker, `pipelines_core/sampling/budget.py`): the activation peak
of that call. A layer maps from the tiny UNet to SD-1.5 by its place: encoder, middle or decoder, self- or
cross-attention.

  weights   the weights in fp16: UNet, VAE, text encoder, and one SD-1.5 ControlNet per ControlNet node
  UNet call the largest counted activation peak of one UNet call (+ the ControlNet call beside it)
  VAE       the counted peak of the VAE decoding 4 frames (the pack's batch), the larger of encode/decode
  latents   the per-frame latent buffers the sampler keeps on the device (latents, noise, eps, x0: 8 copies,
            fp32), times the frame count
  total     weights + max(UNet call, VAE) + latents; compared with --budget-gb
  attn layer  the largest single attention layer of the largest UNet call (in brackets another UNet or
            ControlNet call's, where larger): the most bytes that layer's forward holds above its inputs at its
            peak, counted on fake tensors by MemTracker with the layer's rule and path, not its edits
            (`attention_layer_bytes`): Q, the K and V gathered for the rule's frames, then either SDPA's output
            and the output projection (the fused kernel keeps no probabilities) or, where an edit reads them,
            the scores and probabilities (rows x heads x queries x keys, two such tensors at once). Part of the
            UNet call's peak, not added to it.

What is left out (why the pack spends only a share of what is free): the allocator's fragmentation, the CUDA
context (~0.5 GB), a LoRA's low-rank branches, token edits that shrink a call (VidToMe, TokenFlow: counted as the
full call, so the figure is an upper bound there), stores kept on the CPU or on disk (FateZero's maps, the
inversion's latents) -- those are host memory and are printed as their own column from the run.

    python benchmarks/memory_accounting.py                   # 120 frames at 512x512, every recipe
    python benchmarks/memory_accounting.py --recipes fatezero_edit --frames 48
    python benchmarks/memory_accounting.py --record-frames 20 --tiny-width 128 --tiny-height 128 \
        --recipes sdedit_crossframe rave_edit                # quicker recording

The recording runs the tiny model at --size by default, so a method that picks its layers by token count
(FateZero: layers of at most 32x32 tokens) picks at 512 px what it picks on SD-1.5; a smaller recording
(--tiny-width/--tiny-height) is quicker and gives the same calls for every other recipe. --record-frames below
--frames gives the same calls wherever chunk_size bounds a call (at least chunk_size + 2 frames).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pipelines_core" / "models" / "configs"
GIB = 2 ** 30


def place(name: str, tokens: int) -> tuple:
    """Where an attention layer sits: (encoder|middle|decoder, self|cross, query tokens)."""
    part = "encoder" if name.startswith("down_blocks") else "middle" if name.startswith("mid_block") else "decoder"
    return part, "self" if ".attn1." in name else "cross", tokens


def layer_tokens(module, latent_h: int, latent_w: int) -> dict:
    from comfyui_video_edit.pipelines_core.attention.store import attention_layers

    return {layer.name: layer.tokens for layer in attention_layers(module, latent_h * 8, latent_w * 8)}


def record_calls(recipe: str, clip: str, args) -> dict:
    """Run `recipe` headless on builtin:tiny over `clip`; the distinct UNet/ControlNet calls it made."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from comfyui_video_edit.headless import execute, object_info, ui_to_api
    from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from comfyui_video_edit.pipelines_core.attention.processor import AttnCall

    info = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
    prompt = ui_to_api(json.loads((ROOT / "workflows" / f"{recipe}.json").read_text()), info)
    controlnets = 0
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind in ("VE_LoadVideo", "VE_LoadVideoLatents"):
            inputs.update(video=clip, frame_cap=args.record_frames, width=args.tiny_width, height=args.tiny_height)
        if "steps" in inputs:
            inputs["steps"] = args.steps
        controlnets += kind == "VE_ControlNetCondition"

    calls = {}

    def seen(module, a, kw):
        from torch._subclasses.fake_tensor import FakeTensor

        layout = (kw.get("cross_attention_kwargs") or {}).get("layout")
        sample = a[0] if a else kw["sample"]
        if isinstance(sample, FakeTensor):  # the sampler's own count of a call (budget.py), not a call it makes
            return
        rows = sample.shape[0]
        tokens = layer_tokens(module, *sample.shape[-2:])
        places = {}
        for name, processor in module.attn_processors.items():
            rule = getattr(processor, "rule", None)
            call = AttnCall(name, ".attn1." in name, 1, layout)
            explicit = any(edit.wants_probs(call) for edit in getattr(processor, "edits", ()))
            places.setdefault(place(name, tokens[name]), set()).add(((rule.name if rule else "none"), explicit))
        # The latent size too: a call's rows need not be frames of the clip's size (RAVE's grids are n x n frames).
        key = (type(module).__name__, rows, tuple(sample.shape[-2:]),
               None if layout is None else (layout.frames, layout.roles, layout.groups),
               tuple(sorted((p, tuple(sorted(v))) for p, v in places.items())))
        calls[key] = calls.get(key, 0) + 1

    originals = {}
    for cls in (UNet2DConditionModel, ControlNetModel):  # every call of either class, whichever instance
        originals[cls] = cls.forward

        def forward(self, *a, __original=cls.forward, **kw):
            seen(self, a, kw)
            return __original(self, *a, **kw)

        cls.forward = forward
    try:
        with tempfile.TemporaryDirectory() as out:
            from comfyui_video_edit.nodes import comfy_bridge

            with comfy_bridge.writing_to(out):
                execute(prompt, NODE_CLASS_MAPPINGS)
    finally:
        for cls, forward in originals.items():
            cls.forward = forward
    return {"calls": calls, "controlnets": controlnets}


def sd15(kind: str, dtype):
    """A fake SD-1.5 component (shapes only) from the shipped config."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfyui_video_edit.pipelines_core.sampling.budget import fake_model

    if kind == "text_encoder":
        from comfyui_video_edit.pipelines_core.sampling.budget import _default_dtype

        with _default_dtype(dtype):
            return CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "sd15" / "text_encoder"))
    cls, folder = {"unet": (UNet2DConditionModel, CONFIGS / "sd15" / "unet"),
                   "vae": (AutoencoderKL, CONFIGS / "sd15" / "vae"),
                   "controlnet": (ControlNetModel, CONFIGS / "controlnet_sd15")}[kind]
    return fake_model(cls, cls.load_config(folder), dtype)


def parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def rules_for(places: dict, sd_tokens: dict) -> tuple:
    """SD-1.5 layer name -> Rule, and the layers on the explicit path, from the recorded places: the tiny UNet's
    layer at the same part, kind and token count, else the one of its part and kind nearest in tokens (the tiny
    UNet has two levels, SD-1.5 four)."""
    import math

    from comfyui_video_edit.pipelines_core.attention.rules import get_rule

    rules, explicit = {}, set()
    for name, tokens in sd_tokens.items():
        part, kind, _ = place(name, tokens)
        near = [p for p in places if p[:2] == (part, kind)] or [p for p in places if p[1] == kind]
        nearest = min(near, key=lambda p: abs(math.log(p[2] / tokens)), default=None)
        options = places.get(nearest, {("none", False)})
        rule = max((o[0] for o in options), key=lambda r: get_rule(r)(16).shape[1])  # the widest rule seen there
        rules[name] = get_rule(rule)
        if any(o[1] for o in options):
            explicit.add(name)
    return rules, frozenset(explicit)


def attention_layer_bytes(attn, rows: int, tokens: int, layout, rule, explicit: bool, dtype,
                          text_tokens: int = 77) -> int:
    """The most bytes one forward of attention module `attn` adds above what it is given (its input, the text
    context), counted on fake tensors (call inside `fake_tensors()`) by torch's MemTracker: the module's peak
    less what was held when it was entered. `rows` x `tokens` queries laid out as `layout`, self-attention
    keys/values from the frames `rule` picks; `explicit`: on the explicit softmax path, as where an edit reads
    the probabilities. At its peak it holds Q and the gathered K and V (its own K and V where the rule gathers
    nothing), then SDPA's output and the output projection on the fused path, or the scores and the
    probabilities (rows x heads x queries x keys) at once on the explicit one."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState

    from comfyui_video_edit.pipelines_core.attention.processor import VideoAttnProcessor
    from comfyui_video_edit.pipelines_core.attention.rules import placed_index
    from comfyui_video_edit.pipelines_core.sampling.budget import ExplicitProbabilities

    placed_index.cache_clear()  # so every count holds the rule's index table, not only the first of a shape
    before = attn.processor
    attn.set_processor(VideoAttnProcessor(rule, "counted", (ExplicitProbabilities(),) if explicit else ()))
    tracker = MemTracker()
    tracker.track_external(attn)
    try:
        with tracker, torch.no_grad():
            # Made under the tracker, so the inputs are counted before the layer is entered: a view the layer
            # takes of an input it was given from outside would otherwise count the input as the layer's own.
            hidden = torch.empty(rows, tokens, attn.to_q.in_features, dtype=dtype)
            context = (torch.empty(rows, text_tokens, attn.to_k.in_features, dtype=dtype)
                       if attn.is_cross_attention else None)
            attn(hidden, encoder_hidden_states=context, layout=layout)
    finally:
        attn.set_processor(before)
    stats = tracker.memory_tracking[attn]
    entered = stats.snapshots[_ModState.PRE_FW][-1]
    return int(sum(stats.local_peak.values()) - sum(snap["Total"] for snap in entered.values()))


def largest_attention_layer(model, layout, latent_size: tuple, rules: dict, explicit: frozenset, dtype,
                            counted: dict) -> tuple:
    """(bytes, layer name) of the attention layer of `model` whose forward holds the most
    (`attention_layer_bytes`) in one call laid out as `layout`; `counted` caches layers of the same shape."""
    from comfyui_video_edit.pipelines_core.attention.store import attention_layers

    rows = len(layout.roles or ("cond",)) * layout.frames
    best = (0, "")
    for layer in attention_layers(model, latent_size[0] * 8, latent_size[1] * 8):
        attn = model.get_submodule(layer.name.removesuffix(".processor"))
        rule, on_explicit = rules[layer.name], layer.name in explicit
        key = (attn.to_q.in_features, attn.to_k.in_features, attn.heads, layer.tokens, rule.name, on_explicit,
               layout.frames, len(layout.roles or ("cond",)), layout.groups)
        if key not in counted:
            counted[key] = attention_layer_bytes(attn, rows, layer.tokens, layout, rule, on_explicit, dtype)
        if counted[key] > best[0]:  # the first of equal layers: the encoder's before the decoder's
            block = layer.name.split(".attentions.")[0]
            best = (counted[key], f"{block} {'attn1' if layer.is_self else 'attn2'}, {layer.tokens} tokens")
    return best


def count(recorded: dict, args) -> dict:
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from comfyui_video_edit.pipelines_core.attention.processor import FrameLayout
    from comfyui_video_edit.pipelines_core.sampling.budget import activation_peak, fake_tensors, unet_call_bytes

    dtype = torch.float16
    h, w = args.size // 8, args.size // 8
    with fake_tensors():
        unet, vae, text = sd15("unet", dtype), sd15("vae", dtype), sd15("text_encoder", dtype)
        resident = parameter_bytes(unet) + parameter_bytes(vae) + parameter_bytes(text)
        controlnet_bytes, controlnet_call = 0, {}
        if recorded["controlnets"]:
            cn = sd15("controlnet", dtype)
            controlnet_bytes = parameter_bytes(cn) * recorded["controlnets"]
        vae_peak = 0
        for decode in (True, False):
            tracker = MemTracker()
            tracker.track_external(vae)
            with tracker, torch.no_grad():
                if decode:
                    vae.decode(torch.empty(4, 4, h, w, dtype=dtype))
                else:
                    vae.encode(torch.empty(4, 3, args.size, args.size, dtype=dtype))
            vae_peak = max(vae_peak, activation_peak(tracker.get_tracker_snapshot("peak")))
        unet_peak, worst, worst_layer, any_layer, counted = 0, None, (0, ""), (0, ""), {}
        for (kind, rows, (tiny_h, tiny_w), layout, places), n in recorded["calls"].items():
            places = {p: set(v) for p, v in places}
            frames, roles, groups = layout if layout else (rows, ("cond",), 1)
            # The call's latent size at --size: the recording's, scaled as the frames are (a grid stays n x n).
            size = (round(tiny_h * args.size / args.tiny_height), round(tiny_w * args.size / args.tiny_width))
            model = cn if kind == "ControlNetModel" else unet
            rules, explicit = rules_for(places, layer_tokens(model, *size))
            layer = largest_attention_layer(model, FrameLayout(frames, (), roles, groups=groups), size, rules,
                                            explicit, dtype, counted.setdefault(kind, {}))
            any_layer = max(any_layer, layer)
            if kind == "ControlNetModel":
                tracker = MemTracker()
                tracker.track_external(cn)
                with tracker, torch.no_grad():
                    cn(torch.empty(rows, 4, *size, dtype=dtype), 999,
                       encoder_hidden_states=torch.empty(rows, 77, 768, dtype=dtype),
                       controlnet_cond=torch.empty(rows, 3, size[0] * 8, size[1] * 8, dtype=dtype),
                       return_dict=False)
                controlnet_call[rows, size] = activation_peak(tracker.get_tracker_snapshot("peak"))
                continue
            peak = unet_call_bytes(unet, FrameLayout(frames, (), roles, groups=groups), size, rules,
                                   probabilities=explicit)
            if peak > unet_peak:
                widest = max((r for name, r in rules.items() if ".attn1." in name), key=lambda r: r(16).shape[1])
                unet_peak, worst, worst_layer = peak, (rows, frames, roles, groups, sorted(explicit) != [],
                                                       widest.name, size != (h, w) and size), layer
    call = unet_peak + max(controlnet_call.values(), default=0)
    latents = 8 * args.frames * 4 * h * w * 4
    total = resident + controlnet_bytes + max(call, vae_peak) + latents
    return {"resident": resident + controlnet_bytes, "unet_call": unet_peak, "controlnet_call":
            max(controlnet_call.values(), default=0), "vae": vae_peak, "latents": latents, "total": total,
            "worst": worst, "attn_layer": worst_layer, "attn_layer_any": any_layer}


def describe(figures: dict) -> str:
    """The largest UNet call and its largest attention layer, in words; another call's layer if it is larger."""
    rows, frames, roles, groups, explicit, widest, size = figures["worst"]
    text = f"{rows} ({frames} x {','.join(roles)})" + (f" in {groups} groups" if groups > 1 else "")
    text += f" of {size[0] * 8}x{size[1] * 8} px" if size else ""
    text += f", {widest}" + (", probabilities read" if explicit else "") + f"; {figures['attn_layer'][1]}"
    size, name = figures["attn_layer_any"]
    if size > figures["attn_layer"][0]:
        text += f" [{size / GIB:.2f} {name}]"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", default=sorted(p.stem for p in (ROOT / "workflows").glob("*.json")))
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--size", type=int, default=512, help="square frame size the figures are for")
    parser.add_argument("--steps", type=int, default=2, help="steps of the tiny recording run")
    parser.add_argument("--record-frames", type=int, default=None,
                        help="frames of the recording run (default --frames). Fewer is quicker and gives the same "
                             "calls wherever chunk_size bounds a call: at least chunk_size + 2")
    # The recording runs at the pixel size the figures are for, so each layer has the token count it has in SD-1.5
    # (a method that picks its layers by tokens, as FateZero does, picks the same ones).
    parser.add_argument("--tiny-width", type=int, default=None, help="recording frame width (default --size)")
    parser.add_argument("--tiny-height", type=int, default=None, help="recording frame height (default --size)")
    parser.add_argument("--budget-gb", type=float, default=24.0)
    args = parser.parse_args()
    args.tiny_width, args.tiny_height = args.tiny_width or args.size, args.tiny_height or args.size
    args.record_frames = args.record_frames or args.frames

    import torch

    from bench_recipes import write_sweep_clip

    torch.set_num_threads(1)
    print(f"SD-1.5 fp16, {args.frames} frames at {args.size}x{args.size}: computed on fake tensors (not measured), "
          f"calls recorded over {args.record_frames} frames; GiB")
    print(f"{'recipe':22} {'weights':>7}  {'UNet call':>9}  {'CN call':>7}  {'VAE':>5}  {'latents':>7}  {'total':>6}  "
          f"{'fits':>4}  {'attn layer':>10}  largest call: rows (frames x roles), widest rule; its largest attention "
          f"layer [another call's, if larger]")
    failed = 0
    with tempfile.TemporaryDirectory() as folder:
        clip = write_sweep_clip(args.record_frames, args.tiny_width, args.tiny_height, folder)
        for recipe in args.recipes:
            figures = count(record_calls(recipe, clip, args), args)
            fits = figures["total"] <= args.budget_gb * 1e9
            failed += not fits
            cn_call = f"{figures['controlnet_call'] / GIB:7.2f}" if figures["controlnet_call"] else f"{'-':>7}"
            print(f"{recipe:22} {figures['resident'] / GIB:7.2f}  {figures['unet_call'] / GIB:9.2f}  {cn_call}  "
                  f"{figures['vae'] / GIB:5.2f}  {figures['latents'] / GIB:7.2f}  {figures['total'] / GIB:6.2f}  "
                  f"{'yes' if fits else 'NO':>4}  {figures['attn_layer'][0] / GIB:10.2f}  {describe(figures)}",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
