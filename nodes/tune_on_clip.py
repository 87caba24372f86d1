"""Tune on Clip: Tune-A-Video's one-shot tuning, saved as a LoRA and returned as the model with it applied."""

from __future__ import annotations

import os

from . import comfy_bridge
from ..pipelines_core.methods.tune_a_video import TuneSettings, save_lora, tune_on_clip
from ..pipelines_core.models.lora import add_lora
from ..pipelines_core.video.encode import check_writable, output_folder


class VE_TuneOnClip:
    DESCRIPTION = (
        "Tune-A-Video's one-shot tuning: teach the model this clip under its source prompt before editing it "
        "(DDIM Invert and the sampler then keep its motion and look). Trains a small LoRA on the attention "
        "queries with sparse-causal (first+previous) attention, saves it to models/loras (headless: the output "
        "folder) under the next numbered name, never overwriting, and returns the model with it applied, as "
        "LoRA Apply would. Minutes on a GPU for 8 frames at 512; a few GiB of memory with gradient checkpointing."
    )
    CATEGORY = "video edit/models"
    RETURN_TYPES = ("VE_MODEL", "STRING")
    RETURN_NAMES = ("model", "lora_path")
    OUTPUT_TOOLTIPS = ("The incoming model with the tuned LoRA active (strength 1); the incoming model is unchanged.",
                       "Full path of the LoRA file written (diffusers/peft layout; LoRA Apply loads it).")
    FUNCTION = "tune"
    OUTPUT_NODE = True  # it writes a file: it runs (and saves the LoRA) even with nothing connected after it

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("VE_MODEL", {"tooltip": "From Load Model (or LoRA Apply: its LoRAs stay on while tuning)."}),
                "frames": ("IMAGE", {"tooltip": "The clip to learn (sizes a multiple of 8); every frame is in every "
                                                "step, so cap its length in Load Video (the paper: 8 frames)."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "The clip's source prompt, e.g. 'a man is skiing'; use the same "
                                                 "in DDIM Invert, and change words of it for the edit."}),
                "steps": ("INT", {"default": 200, "min": 1, "max": 10000,
                                  "tooltip": "Training steps (the paper: 500 at lr 3e-5, full-rank queries)."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                                            "tooltip": "AdamW learning rate; 1e-4 suits a rank-4 LoRA."}),
                "rank": ("INT", {"default": 4, "min": 1, "max": 128,
                                 "tooltip": "LoRA rank of the query updates (higher = more capacity, bigger file)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**53 - 1,
                                 "tooltip": "Seeds the LoRA's start, the timesteps and the noise: same seed, same LoRA."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True,
                                                       "tooltip": "Recompute activations in the backward pass: about "
                                                                  "a third of the memory, about a third slower."}),
                "filename_prefix": ("STRING", {"default": "tune_a_video/clip",
                                               "tooltip": "Name of the LoRA under models/loras (may include a "
                                                          "subfolder); a number is appended, files are never "
                                                          "overwritten."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        """Refuse a prefix or a folder that cannot be written before minutes of tuning are spent."""
        if filename_prefix is None:  # linked: known only when the graph runs
            return True
        try:
            folder = output_folder(comfy_bridge.lora_directory(), filename_prefix)
            check_writable(folder)
        except ValueError as err:
            return f"Tune on Clip: {err}"
        except OSError as err:
            return (f"Tune on Clip: filename_prefix {filename_prefix!r}: cannot write to {folder} "
                    f"({err.strerror or type(err).__name__}): choose another filename_prefix or make it writable.")
        return True

    def tune(self, model, frames, prompt, steps, learning_rate, rank, seed, gradient_checkpointing,
             filename_prefix="tune_a_video/clip"):
        settings = TuneSettings(prompt, steps, learning_rate, rank, seed, gradient_checkpointing)
        comfy_bridge.load_for_use(model)
        result = tune_on_clip(model, frames, settings, progress=comfy_bridge.progress("Tune on Clip"))
        path = str(save_lora(result, comfy_bridge.lora_directory(), filename_prefix))
        text = (f"{os.path.basename(path)}: denoising loss on the clip {result.loss_before:.4f} -> "
                f"{result.loss_after:.4f}")
        return {"ui": {"text": [text]}, "result": (add_lora(model, path, 1.0), path)}
