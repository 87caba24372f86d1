"""Flow Warp: optical flow between consecutive frames, with occlusion masks, for temporal guidance."""

from __future__ import annotations

import os

import torch

from . import comfy_bridge
from ..pipelines_core.flow.warp import flow_to_image, image_to_nchw, warp
from ..pipelines_core.flow.estimate import METHODS, estimate_flow, translation_flow

ESTIMATORS = list(METHODS) + ["translation"]


class VE_FlowWarp:
    DESCRIPTION = (
        "Estimate optical flow between consecutive frames (OpenCV DIS by default; Farneback; RAFT from a weights "
        "file you supply; or a synthetic constant translation) with occlusion masks from a forward-backward check. "
        "Convention: warp(frame_i, backward flow) ≈ frame_i+1."
    )
    CATEGORY = "video edit/flow"
    RETURN_TYPES = ("VE_FLOW", "IMAGE")
    RETURN_NAMES = ("flow", "preview")
    OUTPUT_TOOLTIPS = ("Forward/backward flows and occlusion masks, for the sampler's temporal guidance.",
                       "Each frame warped from the previous one (check alignment), or the flow as colours.")
    FUNCTION = "estimate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The SOURCE clip (flows describe its motion)."}),
                "estimator": (ESTIMATORS, {"default": "dis",
                                           "tooltip": "dis: fast and accurate (default); farneback; raft: needs "
                                                      "raft_weights; translation: a synthetic pan (dx, dy px per frame)."}),
                "preview": (["warped", "flow colours"], {"default": "warped",
                                                         "tooltip": "What the preview output shows."}),
                "occlusion_alpha": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001,
                                              "tooltip": "Forward-backward check: relative tolerance."}),
                "occlusion_beta": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.01,
                                             "tooltip": "Forward-backward check: absolute tolerance (px²)."}),
            },
            "optional": {
                "raft_weights": ("STRING", {"default": "",
                                            "tooltip": "Path to torchvision RAFT weights (raft_large/raft_small .pth); "
                                                       "only for estimator raft. Never downloaded."}),
                "dx": ("FLOAT", {"default": 0.0, "min": -256.0, "max": 256.0, "step": 0.5,
                                 "tooltip": "translation: content moves this many pixels right per frame."}),
                "dy": ("FLOAT", {"default": 0.0, "min": -256.0, "max": 256.0, "step": 0.5,
                                 "tooltip": "translation: content moves this many pixels down per frame."}),
            },
        }

    def estimate(self, frames, estimator, preview, occlusion_alpha, occlusion_beta, raft_weights="", dx=0.0, dy=0.0):
        if estimator == "translation":
            flow = translation_flow(frames.shape[0], frames.shape[1], frames.shape[2], dx, dy,
                                    occlusion_alpha, occlusion_beta)
        else:
            if estimator == "raft" and not raft_weights:
                raise ValueError("Flow Warp: estimator raft needs raft_weights (a local torchvision RAFT file)")
            flow = estimate_flow(frames, estimator, os.path.expanduser(raft_weights) if raft_weights else None,
                                 progress=comfy_bridge.progress("Flow Warp"), alpha=occlusion_alpha, beta=occlusion_beta)
        return (flow, preview_images(frames, flow, preview))


def preview_images(frames, flow, kind: str):
    if flow.pairs == 0:
        return frames
    if kind == "flow colours":
        return flow_to_image(flow.fwd)
    warped = warp(image_to_nchw(frames[:-1]), flow.bwd).permute(0, 2, 3, 1)
    return torch.cat([frames[:1], warped]).clamp(0, 1)
