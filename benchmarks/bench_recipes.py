"""Benchmark every recipe in workflows/: its UNet calls against the same calls run bare, in time and in FLOPs.

Each workflow runs in its own process (so peak memory is its own): once untimed (warm-up; it records every UNet
call's shapes and counts the FLOPs those calls execute with torch's FlopCounterMode), then --reps times timed, each
rep followed by a timed bare replay of the same calls. Bare = the same UNet with the processors diffusers gives it
by default (`AttnProcessor2_0`, fused scaled-dot-product attention; `set_bare_baseline`), no hooks, no ControlNet,
on inputs of the same shapes, minus a live source chunk (FateZero's source branch is extra work a plain
diffusers edit does not do). Per recipe it prints:

  UNet s min/med   time of the recipe's UNet calls (CPU: time.process_time; CUDA: synchronised wall), min/median
  bare s min/med   the same for the bare replay
  time ratio       recipe / bare (medians)
  FLOP ratio       executed FLOPs of the recipe's UNet calls / the bare replay's (a live source chunk, attention
                   over more frames = more WORK)
  overhead         FLOP-normalised overhead = time ratio / FLOP ratio (> 1: slower per FLOP than bare = OVERHEAD)
  graph/bare       the whole graph's time (model build, decode, hints, flow, inversion, VAE, ControlNet, encode)
                   over the bare UNet time
  s/frame          the whole graph's wall seconds per frame
  GFLOP/frame      the recipe's executed network FLOPs (FlopCounterMode) per output frame, over all its steps
  GFLOP/s          achieved: the recipe's UNet FLOPs / their wall time (compare with the matmul peak printed
                   above the table: the best of a few timed large matmuls on the device, same dtype and threads)
and peak RSS, peak GPU memory (torch.cuda.max_memory_allocated), the bytes the inversion stores and the output's
temporal warp error under the source clip's flow (lower = steadier). Beside text2video_zero_edit it also replays
the calls with diffusers' own Text2Video-Zero processors (`CrossFrameAttnProcessor`, classic attention, and
`CrossFrameAttnProcessor2_0`, SDPA), the UNet part of the pipeline diffusers documents (--no-peers skips it).
On the CPU each recipe's process runs torch on --threads threads (default 1): CPU time of one thread stays steady
when other jobs share the machine.

    python benchmarks/bench_recipes.py                              # builtin:tiny on the CPU
    python benchmarks/bench_recipes.py --channels-last --compile    # the same, channels-last and torch.compile'd
    python benchmarks/bench_recipes.py --model builtin:sd15-random --device cuda --dtype fp16 \
        --frames 8 --steps 20 --width 512 --height 512             # SD-1.5-sized random weights on a GPU

`--frames-sweep 8,40,100,250,500` instead measures, per frame count, the wall time and peak RSS of the streaming
path (Load Video as Latents -> Sampler from the latent -> Video Encode from the latent: `open_video` batches ->
`encode_frame_stream` -> `sample_video(latent=...)` -> `decode_latent_stream` -> `encode_video`) and of the
in-memory path (`load_video` -> `sample_video(images=...)` -> `decode_latents` -> `encode_video`), each in its own
process, on a synthetic clip of the largest count at --width x --height (SDEdit 0.6, first+previous, CFG 7.5):

    python benchmarks/bench_recipes.py --frames-sweep 8,40,100,250,500 --width 128 --height 96 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))


def configure(prompt: dict, args) -> dict:
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "VE_LoadVideo":
            inputs.update(frame_cap=args.frames, width=args.width, height=args.height)
        elif kind == "VE_LoadModel":
            inputs.update(checkpoint=args.model, device=args.device, dtype=args.dtype)
        elif kind in ("VE_CrossFrameSampler", "VE_DDIMInvert", "VE_RFInvert"):
            inputs["steps"] = args.steps
        elif kind == "VE_InjectFlowEdit":  # FlowEdit runs the last n_max of the sampler's steps
            inputs["n_max"] = min(inputs["n_max"], args.steps)
        elif kind == "VE_ControlNetCondition" and args.model != "builtin:tiny":
            inputs["controlnet"] = args.controlnet or inputs["controlnet"]
    return prompt


# ---- the bare baseline and FLOP counting (unit-tested in tests/test_benchmark_setup.py) -----------------------

def default_attn_processors(unet) -> dict:
    """The processors diffusers gives every attention layer of `unet` by default, keyed like `unet.attn_processors`.

    Mirrors diffusers' `Attention.__init__`: `AttnProcessor2_0` (fused scaled-dot-product attention) where torch has
    `F.scaled_dot_product_attention` and the layer scales q.k, else the classic `AttnProcessor` (explicit softmax).
    Not `unet.set_default_attn_processor()`, which installs the classic `AttnProcessor` everywhere.
    """
    import torch.nn.functional as F
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if getattr(unet, "family", None) == "flux":  # Flux's joint attention has one default processor
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return {key: FluxAttnProcessor() for key in unet.attn_processors}
    processors = {}
    for key in unet.attn_processors:
        layer = unet.get_submodule(key.removesuffix(".processor"))
        sdpa = hasattr(F, "scaled_dot_product_attention") and getattr(layer, "scale_qk", True)
        processors[key] = AttnProcessor2_0() if sdpa else AttnProcessor()
    return processors


def set_bare_baseline(unet, channels_last: bool = False):
    """Make `unet` the bare baseline: diffusers' default (SDPA) attention on every layer, nothing of the pack's."""
    import torch

    unet.set_attn_processor(default_attn_processors(unet))
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def bare_rows(batch: int, layout) -> int:
    """Rows of the plain diffusers call that does the same edit: the recipe's batch without a live source chunk
    (the extra work FateZero-style recipes do), i.e. [uncond, cond] x frames with CFG."""
    roles = tuple(getattr(layout, "roles", ()) or ())
    if "source" in roles and batch % len(roles) == 0:
        return batch // len(roles) * (len(roles) - 1)
    return batch


def count_flops(fn, *args, **kwargs) -> tuple:
    """(FLOPs torch's FlopCounterMode counts while `fn(*args, **kwargs)` runs, its result)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # torch counts the CUDA SDPA kernels but not the CPU one: without this an SDPA run on the CPU would count no
    # attention at all, and every recipe that takes an explicit-softmax path would look like extra work.
    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        out = fn(*args, **kwargs)
    return counter.get_total_flops(), out


def unet_inputs(shape, context_shape, dtype, device, channels_last: bool = False) -> tuple:
    import torch

    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, torch.tensor(500, device=device), torch.randn(context_shape, device=device, dtype=dtype)


def added_inputs(unet, rows: int, dtype, device) -> dict:
    """What the network reads besides latent, timestep and text (SDXL's pooled text and size ids, Flux's pooled
    text and guidance), of the right shapes: the replays time the same work the recipe's calls did."""
    from comfyui_video_edit.pipelines_core.models.backbone import blank_unet_kwargs

    added = blank_unet_kwargs(unet.config, rows, dtype)
    return {k: {n: (t.to(device) if t is not None else None) for n, t in v.items()} for k, v in added.items()}


def matmul_peak(device: str, dtype) -> float:
    """FLOP/s of the best of a few large square matmuls: the device's practical peak for this dtype."""
    import torch

    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


_COMPILED: dict = {}


def runner(unet, args):
    """`unet`, or with --compile its torch.compile'd module (compiled once per UNet)."""
    import torch

    if not args.compile:
        return unet
    return _COMPILED.setdefault(id(unet), torch.compile(unet))


def prepare_replay(unet, processors, calls, device, args) -> int:
    """Install `processors`, warm up each distinct call shape (first calls allocate and pick kernels), and return
    the FLOPs the calls execute (FlopCounterMode, one count per distinct shape times its number of calls)."""
    import torch

    unet.set_attn_processor(dict(processors) if isinstance(processors, dict) else processors)
    counts = {}
    for call in calls:
        counts[call] = counts.get(call, 0) + 1
    flops = 0
    with torch.inference_mode():
        for (shape, context, dtype), count in counts.items():
            inputs = unet_inputs(shape, context, dtype, device, args.channels_last)
            added = added_inputs(unet, shape[0], dtype, device)
            runner(unet, args)(*inputs, **added)
            flops += count_flops(unet, *inputs, **added)[0] * count
    return flops


def timed_replay(unet, processors, calls, device, args, clock, sync) -> tuple:
    """One timed replay of `calls` on `processors`: (clock seconds, wall seconds) of the UNet calls alone."""
    import torch

    unet.set_attn_processor(dict(processors) if isinstance(processors, dict) else processors)
    run = runner(unet, args)
    c = w = 0.0
    with torch.inference_mode():
        for shape, context, dtype in calls:
            inputs = unet_inputs(shape, context, dtype, device, args.channels_last)
            added = added_inputs(unet, shape[0], dtype, device)
            sync()
            c0, w0 = clock(), time.perf_counter()
            run(*inputs, **added)
            sync()
            c += clock() - c0
            w += time.perf_counter() - w0
    return c, w


def run_child(recipe: str, args) -> dict:
    import statistics

    import torch
    from diffusers import UNet2DConditionModel

    from comfyui_video_edit.headless import execute, object_info, ui_to_api
    from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_bridge
    from comfyui_video_edit.pipelines_core.models.flux import FluxNetwork
    from comfyui_video_edit.pipelines_core.sampling.inversion import clear_inversion_cache

    info = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
    prompt = configure(ui_to_api(json.loads((ROOT / "workflows" / f"{recipe}.json").read_text()), info), args)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # CPU: CPU seconds of the process (all threads), which shared-machine load disturbs less than wall time.
    clock = time.perf_counter if cuda else time.process_time

    # The denoiser network's class: a UNet's, or the wrapper a Flux transformer is called through.
    originals = {cls: cls.forward for cls in (UNet2DConditionModel, FluxNetwork)}
    state = {"counting": True, "flops": 0, "calls": [], "unet": None, "cpu": 0.0, "wall": 0.0, "compiled": {},
             "replaying": False, "instances": set()}

    def forward(self, *a, **kw):  # every UNet call of the recipe goes through here
        original_forward = originals[type(self)]
        if state["replaying"]:  # the bare and peer replays: straight through
            return original_forward(self, *a, **kw)
        state["instances"].add(id(self))
        if state["unet"] is None:
            state["unet"] = self
            if args.channels_last:
                self.to(memory_format=torch.channels_last)
        if state["counting"]:  # pass 0 (also the warm-up): record shapes and count the executed FLOPs
            sample = a[0] if a else kw["sample"]
            context = kw.get("encoder_hidden_states", a[2] if len(a) > 2 else None)
            layout = (kw.get("cross_attention_kwargs") or {}).get("layout")
            rows = bare_rows(sample.shape[0], layout)
            state["calls"].append(((rows,) + tuple(sample.shape[1:]), (rows,) + tuple(context.shape[1:]),
                                   sample.dtype))
            flops, out = count_flops(original_forward, self, *a, **kw)
            state["flops"] += flops
            return out
        fn = original_forward
        if args.compile:
            fn = state["compiled"].setdefault(id(self), torch.compile(original_forward))
        sync()
        c0, w0 = clock(), time.perf_counter()
        out = fn(self, *a, **kw)
        sync()
        state["cpu"] += clock() - c0
        state["wall"] += time.perf_counter() - w0
        return out

    for cls in originals:
        cls.forward = forward
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    graph_cpu, graph_wall, unet_cpu, unet_wall, bare_cpu, bare_wall = [], [], [], [], [], []
    bare_flops = 0
    try:
        # rep 0: counting pass and warm-up, untimed. Then each rep times the recipe and, right after it, the bare
        # replay of its calls, so a change in the shared machine's load hits both sides of the ratio alike.
        warm = 2 if args.compile else 1  # with --compile, rep 1 compiles the recipe's UNet calls, untimed too
        for rep in range(args.reps + warm):
            state["counting"], state["cpu"], state["wall"] = rep == 0, 0.0, 0.0
            clear_inversion_cache()  # every timed rep inverts again, as a fresh run would
            sync()
            c0, w0 = clock(), time.perf_counter()
            with comfy_bridge.writing_to(args.output_dir):
                result = execute(prompt, NODE_CLASS_MAPPINGS)
            sync()
            state["replaying"] = True
            if rep == 0:
                unet, calls = state["unet"], state["calls"]
                device = next(unet.parameters()).device
                set_bare_baseline(unet, args.channels_last)
                bare = dict(unet.attn_processors)
                bare_flops = prepare_replay(unet, bare, calls, device, args)
                state["replaying"] = False
                continue
            if rep < warm:
                state["replaying"] = False
                continue
            graph_cpu.append(clock() - c0)
            graph_wall.append(time.perf_counter() - w0)
            unet_cpu.append(state["cpu"])
            unet_wall.append(state["wall"])
            c, w = timed_replay(unet, bare, calls, device, args, clock, sync)
            bare_cpu.append(c)
            bare_wall.append(w)
            state["replaying"] = False
    finally:
        for cls, original in originals.items():
            cls.forward = original
    gpu_peak = torch.cuda.max_memory_allocated() if cuda else 0

    # Temporal consistency: warp error of the sampler's frames under the source clip's DIS flow.
    from comfyui_video_edit.pipelines_core.flow.warp import warp_error
    from comfyui_video_edit.pipelines_core.flow.estimate import estimate_flow

    by_class = {node["class_type"]: node_id for node_id, node in prompt.items()}
    source = result.outputs[by_class["VE_LoadVideo"]][0]
    edited = result.outputs[by_class["VE_CrossFrameSampler"]][0]
    consistency = warp_error(edited, estimate_flow(source)) if edited.shape == source.shape else float("nan")

    stored = 0
    for node_id, node in prompt.items():
        if node["class_type"] == "VE_DDIMInvert":
            inversion = result.outputs[node_id][0]
            stored += sum(t.numel() * t.element_size() for t in inversion.latents.values())
            stored += inversion.store.nbytes if inversion.store is not None else 0

    med = statistics.median
    bare = {"cpu_min": min(bare_cpu), "cpu_med": med(bare_cpu), "wall_med": med(bare_wall), "flops": bare_flops}
    peers = {}
    if args.peers and recipe.startswith("text2video_zero"):
        # Text2Video-Zero's processors as diffusers ships them (every frame attends to the first), on the same calls.
        from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
            CrossFrameAttnProcessor, CrossFrameAttnProcessor2_0)

        for name, make in (("diffusers CrossFrameAttnProcessor", CrossFrameAttnProcessor),
                           ("diffusers CrossFrameAttnProcessor2_0", CrossFrameAttnProcessor2_0)):
            processor = make(batch_size=2)
            flops = prepare_replay(unet, processor, calls, device, args)
            times = [timed_replay(unet, processor, calls, device, args, clock, sync) for _ in range(args.reps)]
            peers[name] = {"cpu_min": min(c for c, _ in times), "cpu_med": med(c for c, _ in times), "flops": flops}
        set_bare_baseline(unet)

    frames = args.frames
    return {
        "recipe": recipe, "unet_calls": len(calls), "reps": args.reps, "unet_instances": len(state["instances"]),
        "graph_wall_med": med(graph_wall), "graph_cpu_min": min(graph_cpu), "graph_cpu_med": med(graph_cpu),
        "s_per_frame": med(graph_wall) / frames, "flops_per_frame": state["flops"] / frames,
        "unet_cpu_min": min(unet_cpu), "unet_cpu_med": med(unet_cpu), "unet_wall_med": med(unet_wall),
        "bare": bare, "peers": peers,
        "time_ratio": med(unet_cpu) / bare["cpu_med"], "time_ratio_min": min(unet_cpu) / bare["cpu_min"],
        "graph_ratio": med(graph_cpu) / bare["cpu_med"],
        "unet_flop": state["flops"], "flop_ratio": state["flops"] / bare["flops"],
        "overhead": (med(unet_cpu) / bare["cpu_med"]) / (state["flops"] / bare["flops"]),
        "achieved_flops": state["flops"] / med(unet_wall), "bare_flops_s": bare["flops"] / bare["wall_med"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu_peak_mb": gpu_peak / 2**20, "inversion_mb": stored / 2**20, "warp_error": consistency,
    }


# ---- --frames-sweep: memory against clip length ----------------------------------------------------------------

def write_sweep_clip(frames: int, width: int, height: int, folder: str) -> str:
    """A synthetic clip (moving colour gradients) of `frames` frames, written a batch at a time."""
    import torch

    from comfyui_video_edit.pipelines_core.video.encode import encode_video

    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")

    def batches():
        for start in range(0, frames, 20):
            t = torch.arange(start, min(start + 20, frames)).view(-1, 1, 1) / max(frames, 1)
            yield torch.stack([(x + t) % 1, (y + 2 * t) % 1, (x * y + 3 * t) % 1], dim=-1)

    return encode_video(batches(), folder, "sweep_clip", 24, format="ffv1-mkv", frame_count=frames)


def run_sweep_child(path: str, clip: str, frames: int, args) -> dict:
    import torch

    from comfyui_video_edit.pipelines_core.models.model import (decode_latent_stream, decode_latents, encode_frame_stream,
                                                          load_model, posterior_generators)
    from comfyui_video_edit.pipelines_core.sampling.sampler import sample_video
    from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
    from comfyui_video_edit.pipelines_core.video.encode import encode_video
    from comfyui_video_edit.pipelines_core.video.decode import load_video, open_video

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    settings = SamplerSettings("a watercolor painting", seed=42, steps=args.steps, strength=0.6,
                               attention="first+previous", chunk_size=8)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    start = time.perf_counter()
    if path == "stream":
        stream = open_video(clip, frame_cap=frames)
        latent = {"samples": encode_frame_stream(model, stream.batches(8), posterior_generators(settings.seed))}
        latents = sample_video(model, settings, latent=latent)
        unscaled = (latents / model.vae_scale).float().cpu()  # what the sampler node's LATENT output holds
        encode_video(decode_latent_stream(model, unscaled, scaled=False), args.output_dir, "sweep",
                     stream.info["fps"], audio=stream.audio, frame_count=frames)
    else:
        images, info, audio = load_video(clip, frame_cap=frames)
        latents = sample_video(model, settings, images=images)
        encode_video(decode_latents(model, latents), args.output_dir, "sweep", info["fps"], audio=audio)
    sync()
    return {"path": path, "frames": frames, "wall_s": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def frames_sweep(args) -> int:
    import tempfile

    counts = [int(n) for n in args.frames_sweep.split(",")]
    print(f"frames sweep: model {args.model}, {args.device} {args.dtype}, {args.width}x{args.height}, "
          f"{args.steps} steps (SDEdit 0.6: {int(args.steps * 0.6)} run), first+previous, chunk 8, CFG 7.5")
    print(f"{'frames':>6} {'stream s':>9} {'stream RSS MB':>13} {'in-memory s':>11} {'in-memory RSS MB':>16} "
          f"{'IMAGE MB':>9} {'latents MB':>10}")
    with tempfile.TemporaryDirectory() as folder:
        clip = write_sweep_clip(max(counts), args.width, args.height, folder)
        for frames in counts:
            row = {}
            for path in ("stream", "memory"):
                cmd = [sys.executable, __file__, "--sweep-child", path, "--sweep-clip", clip, "--frames", str(frames),
                       "--model", args.model, "--device", args.device, "--dtype", args.dtype,
                       "--steps", str(args.steps), "--output-dir", args.output_dir]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    err = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
                    print(f"{frames:6d} {path} failed: {err}")
                    return 1
                row[path] = json.loads(out.stdout.strip().splitlines()[-1])
            image_mb = frames * args.width * args.height * 3 * 4 / 2**20  # float32 IMAGE of the clip
            latent_mb = frames * 4 * (args.width // 8) * (args.height // 8) * 4 / 2**20
            print(f"{frames:6d} {row['stream']['wall_s']:9.1f} {row['stream']['peak_rss_mb']:13.0f} "
                  f"{row['memory']['wall_s']:11.1f} {row['memory']['peak_rss_mb']:16.0f} {image_mb:9.1f} "
                  f"{latent_mb:10.2f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--controlnet", default="", help="ControlNet for non-tiny models (default: the workflow's)")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--output-dir", default=os.path.join(os.getcwd(), "output", "bench"))
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (recipe calls and bare replay)")
    p.add_argument("--channels-last", action="store_true", help="UNet weights and inputs in channels-last layout")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each recipe's process (CPU only)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (min and median are reported)")
    p.add_argument("--no-peers", dest="peers", action="store_false",
                   help="skip the diffusers Text2Video-Zero processor replays beside text2video_zero_edit")
    p.add_argument("--frames-sweep", metavar="N,N,...",
                   help="peak RSS and wall time of the streaming and in-memory paths per frame count (see above)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--sweep-child", help=argparse.SUPPRESS)
    p.add_argument("--sweep-clip", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch

        if not args.device.startswith("cuda"):  # CPU time of one thread: steady even when others share the CPU
            torch.set_num_threads(args.threads)
        print(json.dumps(run_child(args.child, args)))
        return 0
    if args.sweep_child:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(json.dumps(run_sweep_child(args.sweep_child, args.sweep_clip, args.frames, args)))
        return 0
    if args.frames_sweep:
        return frames_sweep(args)
    import torch

    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)  # the peak of the threads the recipes run on
    peak = matmul_peak(args.device, getattr(torch, DTYPES.get(args.dtype, args.dtype)))
    print(f"model {args.model}, {args.device} {args.dtype}, {args.frames} frames {args.width}x{args.height}, "
          f"{args.steps} steps, compile {'on' if args.compile else 'off'}, channels-last "
          f"{'on' if args.channels_last else 'off'}, {args.reps} reps, {torch.get_num_threads()} thread(s); matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("time = CPU seconds (time.process_time) of the UNet calls" if not args.device.startswith("cuda")
          else "time = synchronised wall seconds of the UNet calls")
    header = (f"{'recipe':22} {'calls':>5} {'UNet s min/med':>15} {'bare s min/med':>15} {'time ratio':>10} "
              f"{'FLOP ratio':>10} {'overhead':>8} {'graph/bare':>10} {'s/frame':>7} {'GFLOP/frame':>11} {'GFLOP/s':>7} "
              f"{'RSS MB':>6} {'GPU MB':>6} {'inv MB':>6} {'warp err':>8}")
    print(header)
    for recipe in args.recipes.split(","):
        cmd = [sys.executable, __file__, "--child", recipe, "--model", args.model, "--device", args.device,
               "--dtype", args.dtype, "--frames", str(args.frames), "--steps", str(args.steps),
               "--width", str(args.width), "--height", str(args.height), "--controlnet", args.controlnet,
               "--output-dir", args.output_dir, "--reps", str(args.reps), "--threads", str(args.threads)]
        cmd += ["--compile"] * args.compile + ["--channels-last"] * args.channels_last + ["--no-peers"] * (not args.peers)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{recipe:22} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        b = r["bare"]
        print(f"{r['recipe']:22} {r['unet_calls']:5d} {r['unet_cpu_min']:7.2f}/{r['unet_cpu_med']:<7.2f} "
              f"{b['cpu_min']:7.2f}/{b['cpu_med']:<7.2f} {r['time_ratio']:10.2f} {r['flop_ratio']:10.2f} "
              f"{r['overhead']:8.2f} {r['graph_ratio']:10.2f} {r['s_per_frame']:7.2f} "
              f"{r['flops_per_frame'] / 1e9:11.1f} "
              f"{r['achieved_flops'] / 1e9:7.1f} {r['peak_rss_mb']:6.0f} {r['gpu_peak_mb']:6.0f} "
              f"{r['inversion_mb']:6.2f} {r['warp_error']:8.5f}")
        for name, peer in r["peers"].items():
            ratio, flop_ratio = peer["cpu_med"] / b["cpu_med"], peer["flops"] / b["flops"]
            print(f"  peer: {name} on the same calls: {peer['cpu_min']:.2f}/{peer['cpu_med']:.2f} s, time ratio "
                  f"{ratio:.2f}, FLOP ratio {flop_ratio:.2f}, overhead {ratio / flop_ratio:.2f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
