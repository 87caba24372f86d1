"""The pack's nodes: thin adapters from ComfyUI's node contract to pipelines_core.

Method nodes (one per paper) are not listed here: each declares itself in a `method_<name>.py` file and
`methods.discover()` finds it (see methods.py).
"""

from .attention_injector import VE_AttentionInjector
from .comfy_model import VE_FromComfyModel
from .controlnet_condition import VE_ControlNetCondition
from .cross_frame_sampler import VE_CrossFrameSampler
from .ddim_invert import VE_DDIMInvert
from .flow_warp import VE_FlowWarp
from .load_model import VE_LoadModel
from .load_video import VE_LoadVideo
from .load_video_latents import VE_LoadVideoLatents
from .lora_apply import VE_LoRAApply
from .methods import discover
from .rf_invert import VE_RFInvert
from .temporal_guidance import VE_TemporalGuidance
from .tune_on_clip import VE_TuneOnClip
from .video_encode import VE_VideoEncode

METHODS = discover()

NODE_CLASS_MAPPINGS = {
    "VE_LoadVideo": VE_LoadVideo,
    "VE_LoadModel": VE_LoadModel,
    "VE_FromComfyModel": VE_FromComfyModel,
    "VE_CrossFrameSampler": VE_CrossFrameSampler,
    "VE_VideoEncode": VE_VideoEncode,
    "VE_FlowWarp": VE_FlowWarp,
    "VE_LoRAApply": VE_LoRAApply,
    "VE_DDIMInvert": VE_DDIMInvert,
    "VE_ControlNetCondition": VE_ControlNetCondition,
    "VE_TemporalGuidance": VE_TemporalGuidance,
    "VE_AttentionInjector": VE_AttentionInjector,  # deprecated: split into the method nodes
    **{method.node_id: method.node for method in METHODS},
    "VE_LoadVideoLatents": VE_LoadVideoLatents,
    "VE_TuneOnClip": VE_TuneOnClip,
    "VE_RFInvert": VE_RFInvert,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "VE_LoadVideo": "Load Video (Video Edit)",
    "VE_LoadModel": "Load Model (Video Edit)",
    "VE_FromComfyModel": "Use ComfyUI Model (Video Edit)",
    "VE_CrossFrameSampler": "Cross-Frame Sampler",
    "VE_VideoEncode": "Video Encode",
    "VE_FlowWarp": "Flow Warp",
    "VE_LoRAApply": "LoRA Apply (Video Edit)",
    "VE_DDIMInvert": "DDIM Invert",
    "VE_ControlNetCondition": "ControlNet Condition",
    "VE_TemporalGuidance": "Temporal Guidance",
    "VE_AttentionInjector": "Attention Injector (deprecated)",
    **{method.node_id: method.display_name for method in METHODS},
    "VE_LoadVideoLatents": "Load Video as Latents (Video Edit)",
    "VE_TuneOnClip": "Tune on Clip (Tune-A-Video)",
    "VE_RFInvert": "RF-Inversion Invert (Flux)",
}
