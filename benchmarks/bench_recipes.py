"""Benchmark every recipe in workflows/: wall time against the same UNet calls run bare.

For each workflow (run in its own process so peak memory is its own) it prints: wall time of the
whole graph, the time of the same number of bare UNet calls on inputs of the same shapes (diffusers'
default attention, no hooks, no ControlNet), their ratio (the recipe's overhead: VAE, flow, inversion
bookkeeping, injections, cross-frame attention), peak RSS, peak GPU memory, the bytes the inversion
stores (latents + recorded attention), and the FLOPs of those UNet calls (torch's FlopCounterMode)
divided by the recipe's wall time, i.e. the useful UNet FLOP/s achieved, and the temporal warp error of the
output under the source clip's flow (lower = steadier).

    python benchmarks/bench_recipes.py                              # builtin:tiny on the CPU
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
        elif kind in ("VE_CrossFrameSampler", "VE_DDIMInvert"):
            inputs["steps"] = args.steps
        elif kind == "VE_ControlNetCondition" and args.model != "builtin:tiny":
            inputs["controlnet"] = args.controlnet or inputs["controlnet"]
    return prompt


def run_child(recipe: str, args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from comfyui_video_edit.headless import execute, object_info, ui_to_api
    from comfyui_video_edit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_bridge
    from diffusers import UNet2DConditionModel

    info = object_info(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
    prompt = configure(ui_to_api(json.loads((ROOT / "workflows" / f"{recipe}.json").read_text()), info), args)

    calls, unets = [], []

    def record(module, inputs):  # every UNet forward: the shapes the bare replay will use
        if isinstance(module, UNet2DConditionModel):
            unets.append(module)
            calls.append((tuple(inputs[0].shape), inputs[0].dtype))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with comfy_bridge.writing_to(args.output_dir):
        result = execute(prompt, NODE_CLASS_MAPPINGS)
    sync()
    wall = time.perf_counter() - start
    handle.remove()
    gpu_peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0

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

    unet = unets[0]
    cross = unet.config.cross_attention_dim
    device = next(unet.parameters()).device
    unet.set_default_attn_processor()  # bare: diffusers' own attention, nothing of ours
    bare, flops = 0.0, 0
    with torch.inference_mode():
        for shape, dtype in set(calls):  # warm-up: first calls of a shape pay for allocation and kernel choice
            unet(torch.randn(shape, device=device, dtype=dtype), torch.tensor(500, device=device),
                 encoder_hidden_states=torch.randn(shape[0], 77, cross, device=device, dtype=dtype))
        for shape, dtype in calls:
            x = torch.randn(shape, device=device, dtype=dtype)
            ctx = torch.randn(shape[0], 77, cross, device=device, dtype=dtype)
            t = torch.tensor(500, device=device)
            sync()
            t0 = time.perf_counter()
            unet(x, t, encoder_hidden_states=ctx)
            sync()
            bare += time.perf_counter() - t0
        distinct = {}
        for shape, dtype in calls:
            distinct[(shape, dtype)] = distinct.get((shape, dtype), 0) + 1
        for (shape, dtype), count in distinct.items():
            counter = FlopCounterMode(display=False)
            with counter:
                unet(torch.randn(shape, device=device, dtype=dtype), torch.tensor(500, device=device),
                     encoder_hidden_states=torch.randn(shape[0], 77, cross, device=device, dtype=dtype))
            flops += counter.get_total_flops() * count
    return {
        "recipe": recipe, "wall_s": wall, "unet_calls": len(calls), "bare_unet_s": bare,
        "ratio": wall / bare if bare else float("nan"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu_peak_mb": gpu_peak / 2**20, "inversion_mb": stored / 2**20,
        "unet_tflop": flops / 1e12, "achieved_tflops": flops / wall / 1e12, "warp_error": consistency,
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
    p.add_argument("--frames-sweep", metavar="N,N,...",
                   help="peak RSS and wall time of the streaming and in-memory paths per frame count (see above)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--sweep-child", help=argparse.SUPPRESS)
    p.add_argument("--sweep-clip", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return 0
    if args.sweep_child:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        print(json.dumps(run_sweep_child(args.sweep_child, args.sweep_clip, args.frames, args)))
        return 0
    if args.frames_sweep:
        return frames_sweep(args)
    rows = []
    header = f"{'recipe':22} {'wall s':>8} {'UNet calls':>10} {'bare UNet s':>11} {'ratio':>6} {'peak RSS MB':>11} " \
             f"{'GPU peak MB':>11} {'inversion MB':>12} {'UNet TFLOP':>10} {'TFLOP/s':>8} {'warp err':>9}"
    print(f"model {args.model}, {args.device} {args.dtype}, {args.frames} frames {args.width}x{args.height}, "
          f"{args.steps} steps")
    print(header)
    for recipe in args.recipes.split(","):
        cmd = [sys.executable, __file__, "--child", recipe, "--model", args.model, "--device", args.device,
               "--dtype", args.dtype, "--frames", str(args.frames), "--steps", str(args.steps),
               "--width", str(args.width), "--height", str(args.height), "--controlnet", args.controlnet,
               "--output-dir", args.output_dir]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{recipe:22} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['recipe']:22} {r['wall_s']:8.2f} {r['unet_calls']:10d} {r['bare_unet_s']:11.2f} {r['ratio']:6.2f} "
              f"{r['peak_rss_mb']:11.0f} {r['gpu_peak_mb']:11.0f} {r['inversion_mb']:12.2f} {r['unet_tflop']:10.3f} "
              f"{r['achieved_tflops']:8.4f} {r['warp_error']:9.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
