"""A run whose cross-frame keys/values cannot fit is refused with the figure before any step."""

import pytest
import torch

from comfyui_video_edit.pipelines_core.attention import FrameLayout, VideoAttnProcessor, attention_processors, get_rule
from comfyui_video_edit.pipelines_core.attention.processor import AttnEdit, gathered_kv_bytes
from comfyui_video_edit.pipelines_core.sampling.sampler import check_attention_memory, free_bytes
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings


class _RecordKV(AttnEdit):
    def __init__(self, seen):
        self.seen = seen

    def qkv(self, call, q, k, v):
        self.seen.append(k.numel() * k.element_size() + v.numel() * v.element_size())
        return q, k, v


@pytest.mark.parametrize("rule", ["none", "first+previous", "all"])
def test_the_estimate_is_the_bytes_the_processor_gathers(tiny_model, rule):
    """Measured on the real processor: the first self-attention layer's k and v, for a 5-frame chunk x 2 (CFG)."""
    unet, frames, h, w = tiny_model.unet, 5, 8, 8
    seen = []
    first = next(name for name in unet.attn_processors if name.endswith("attn1.processor"))

    def processor(name):
        edits = (_RecordKV(seen),) if name == first else ()
        return VideoAttnProcessor(get_rule(rule) if "attn1" in name else get_rule("none"), name, edits)

    x = torch.randn(2 * frames, unet.config.in_channels, h, w)
    context = torch.randn(2 * frames, 77, unet.config.cross_attention_dim)
    layout = FrameLayout(frames, tuple(range(frames)), ("uncond", "cond"), 999, 0)
    with torch.no_grad(), attention_processors(unet, processor):
        unet(x, 999, encoder_hidden_states=context, cross_attention_kwargs={"layout": layout})
    expected = gathered_kv_bytes(get_rule(rule), frames, 2 * frames, h * w, unet.config.block_out_channels[0], 4)
    assert seen == [expected]


def test_all_frames_attention_that_cannot_fit_is_refused_with_the_figure(tiny_model):
    settings = SamplerSettings("a cat", attention="all", chunk_size=64)
    # later chunks hold their 64 frames plus the anchor frame
    need = gathered_kv_bytes(get_rule("all"), 65, 130, 64 * 64, tiny_model.unet.config.block_out_channels[0], 4)
    with pytest.raises(ValueError) as info:
        check_attention_memory(tiny_model, settings, 200, (512, 512), available=need - 1, copies=2)
    message = str(info.value)
    assert "\n" not in message and f"{need / 2**30:.1f} GiB" in message and "chunk_size" in message
    check_attention_memory(tiny_model, settings, 200, (512, 512), available=need, copies=2)  # fits: no error
    # sparse-causal attention over the same chunks needs a fraction of it
    check_attention_memory(tiny_model, SamplerSettings("a cat", attention="first+previous", chunk_size=64),
                           200, (512, 512), available=need // 20, copies=2)


def test_a_method_setting_its_own_rule_is_counted_by_that_rule(tiny_model):
    """FLATTEN's plan puts `all` on every self-attention layer whatever the sampler's rule: the check counts the
    widest rule the run's processors use, so the sampler's `none` does not hide the gather."""
    from comfyui_video_edit.pipelines_core.sampling.injection import InjectionPlan
    from comfyui_video_edit.pipelines_core.sampling.sampler import processors, widest_rule

    settings = SamplerSettings("a cat", attention="none", chunk_size=64)
    plan = InjectionPlan(rule_for=lambda name: get_rule("all") if ".attn1." in name else None)
    widest = widest_rule(tiny_model.unet, processors(settings, plan)[0])
    assert widest is get_rule("all")
    assert widest_rule(tiny_model.unet, processors(settings, InjectionPlan())[0]) is get_rule("none")
    need = gathered_kv_bytes(widest, 64, 128, 64 * 64, tiny_model.unet.config.block_out_channels[0], 4)
    check_attention_memory(tiny_model, settings, 200, (512, 512), available=need // 20, copies=2)  # the sampler's
    with pytest.raises(ValueError, match="attention 'all' over 64-frame chunks"):
        check_attention_memory(tiny_model, settings, 200, (512, 512), available=need - 1, copies=2, widest=widest)


def test_free_memory_is_read_on_this_machine():
    free = free_bytes(torch.device("cpu"))
    assert free is None or free > 0


def test_nan_cfg_is_refused_before_any_step():
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        SamplerSettings("a cat", cfg=float("nan")).check(4, from_images=True)
