"""Write assets/tiny_style_lora.safetensors: a kohya-layout LoRA for the builtin:tiny model.

It lets the LoRA workflow run anywhere. Its weights are random (seeded), so like builtin:tiny itself
it changes the output without meaning anything. Run: python assets/make_tiny_lora.py
"""

import os

import torch
from safetensors.torch import save_file

from comfyui_video_edit.pipelines_core.models.model import load_model

RANK, ALPHA, SEED = 4, 4.0, 7


def kohya_name(module_path: str) -> str:
    return "lora_unet_" + module_path.replace(".", "_")


def main() -> str:
    unet = load_model("builtin:tiny", device="cpu").unet
    g = torch.Generator().manual_seed(SEED)
    state = {}
    for path, module in unet.named_modules():
        if ".attn" in path and (path.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or path.endswith("to_out.0")):
            name = kohya_name(path)
            state[f"{name}.lora_down.weight"] = torch.randn(RANK, module.in_features, generator=g) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=g) * 0.3
            state[f"{name}.alpha"] = torch.tensor(ALPHA)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_style_lora.safetensors")
    save_file(state, out)
    return out


if __name__ == "__main__":
    print(main())
