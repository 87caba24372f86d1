"""The attention/feature store: budget, storage, recorders, and the estimate of what a recording needs
(methods.md §3 "Memory of stored attention", §6 C7)."""

import gc
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from comfyui_video_edit.pipelines_core.models.single_file import SD15_CONFIG_DIR
from comfyui_video_edit.pipelines_core.attention.store import (
    AttentionStore, RecordSpec, StoreBudgetError, attention_layers, estimate_bytes, over_budget_message,
)
from comfyui_video_edit.pipelines_core.sampling.inversion import invert_video

GiB = 2**30
EVERYTHING = RecordSpec(self_probs=True, cross_probs=True, qk=True, features=("up_blocks.0.resnets.1", "mid_block"))



pytestmark = pytest.mark.usefixtures("fresh_inversion_cache")


def small_frames(count=3, size=32, seed=2):
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


# --- the store itself ---------------------------------------------------------------------------

def test_put_get_keeps_fp16_on_cpu_and_counts_bytes():
    store = AttentionStore(budget_bytes=1000)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    store.put("a.processor", torch.tensor(21), "self_probs", x)
    got = store.get("a.processor", 21, "self_probs")
    assert got.dtype == torch.float16 and got.device.type == "cpu"
    assert torch.equal(got, x.half())
    assert store.nbytes == 48 and ("a.processor", 21, "self_probs") in store
    store.put("a.processor", 21, "self_probs", x[:1])  # replacing an entry frees its bytes
    assert store.nbytes == 24 and len(store) == 1
    store.reset()
    assert store.nbytes == 0 and len(store) == 0
    with pytest.raises(KeyError, match="nothing recorded"):
        store.get("a.processor", 21, "self_probs")


def test_budget_is_enforced_on_put_with_a_clear_message():
    store = AttentionStore(budget_bytes=100)
    store.put("a", 1, "q", torch.zeros(40))  # 80 bytes
    with pytest.raises(StoreBudgetError, match=r"needs 120 B but the budget is 100 B; lower max_tokens"):
        store.put("b", 1, "q", torch.zeros(20))
    assert store.nbytes == 80 and len(store) == 1
    assert over_budget_message(int(38.2 * GiB), 4 * GiB) == (
        "DDIM Invert: recording needs 38.2 GiB but the budget is 4.0 GiB; "
        "lower max_tokens, record fewer kinds, or use disk storage / raise the budget")


def test_disk_storage_writes_one_file_per_entry_and_cleans_up(tmp_path):
    store = AttentionStore(budget_bytes=GiB, folder=str(tmp_path))
    x = torch.randn(3, 5)
    store.put("up.attn1.processor", 41, "k", x)
    store.put("up.attn1.processor", 21, "k", 2 * x)
    files = os.listdir(store.folder)
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)
    assert torch.equal(store.get("up.attn1.processor", 21, "k"), (2 * x).half())
    assert store.nbytes == 2 * 30
    store.reset()
    assert os.listdir(store.folder) == [] and store.nbytes == 0
    folder = store.folder
    del store
    gc.collect()
    assert not os.path.exists(folder)


# --- recording during inversion -------------------------------------------------------------------

def test_estimate_equals_the_recorded_bytes_exactly(tiny_model):
    frames = small_frames(3)
    inv = invert_video(tiny_model, frames, "a fox", steps=3, record=EVERYTHING, attention="first+previous",
                       chunk_size=2)
    needed = estimate_bytes(EVERYTHING, tiny_model.unet, 3, 32, 32, 3, "first+previous")
    assert inv.store.nbytes == needed > 0
    # steps x (7 self layers x 3 kinds + 7 cross layers + 2 features); 7 blocks: 2 down, 1 mid, 4 up
    assert len(inv.store) == 3 * (7 * 3 + 7 + 2)
    probs = inv.store.get("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor", 1, "self_probs")
    assert probs.shape == (3, 2, 16, 32)  # frames, heads, 4x4 queries, [first, previous] x 16 keys
    assert torch.allclose(probs.float().sum(-1), torch.ones(3, 2, 16), atol=1e-2)
    feature = inv.store.get("up_blocks.0.resnets.1", int(inv.timesteps[1]), "feature")
    assert feature.shape == (3, 64, 2, 2)


def test_only_the_conditional_half_is_recorded_with_cfg(tiny_model):
    """At the first inversion step both runs feed the same x0 and prompt to the cond half."""
    spec = RecordSpec(cross_probs=True)
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    one = invert_video(tiny_model, small_frames(2), "a fox", steps=2, record=spec)
    guided = invert_video(tiny_model, small_frames(2), "a fox", steps=2, cfg=7.5, record=spec)
    other = invert_video(tiny_model, small_frames(2), "", steps=2, record=spec)
    assert guided.store.nbytes == one.store.nbytes == estimate_bytes(spec, tiny_model.unet, 2, 32, 32, 2)
    a, b, c = (inv.store.get(name, 1, "cross_probs").float() for inv in (one, guided, other))
    assert a.shape[0] == 2
    assert (a - b).abs().max() <= 1e-4  # measured 8e-6 (fp16 storage)
    assert (a - c).abs().max() > 1e-3  # the uncond prompt's maps: measured 7e-3 (maps are near 1/77)


def test_C7_max_tokens_between_the_two_resolutions_records_only_the_small_layers(tiny_model):
    layers = attention_layers(tiny_model.unet, 64, 64)
    assert sorted({layer.tokens for layer in layers}) == [16, 64]
    spec = RecordSpec(self_probs=True, cross_probs=True, qk=True, max_tokens=32)
    inv = invert_video(tiny_model, small_frames(2, 64), steps=2, record=spec)
    small = {layer.name for layer in layers if layer.tokens == 16}
    assert {layer for layer, _, _ in inv.store.keys()} == small
    assert all(inv.store.get(*key).shape[2] == 16 for key in inv.store.keys())
    assert inv.store.nbytes == estimate_bytes(spec, tiny_model.unet, 2, 64, 64, 2)


def test_recorders_are_removed_after_inversion(tiny_model):
    unet = tiny_model.unet
    before = dict(unet.attn_processors)
    invert_video(tiny_model, small_frames(2), steps=2, record=EVERYTHING)
    assert all(unet.attn_processors[k] is before[k] for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def test_a_recording_over_budget_is_refused_before_any_step(tiny_model):
    calls = []
    needed = estimate_bytes(EVERYTHING, tiny_model.unet, 2, 32, 32, 5)
    with pytest.raises(StoreBudgetError, match=r"DDIM Invert: recording needs .* but the budget is 1\.0 KiB; .*disk"):
        invert_video(tiny_model, small_frames(2), steps=5, record=EVERYTHING, budget_bytes=1024,
                     progress=lambda d, t: calls.append(d))
    assert calls == [] and needed > 1024


def test_disk_recording_matches_cpu_recording(tiny_model, tmp_path):
    spec = RecordSpec(self_probs=True, max_tokens=16)
    cpu = invert_video(tiny_model, small_frames(2), steps=2, record=spec)
    disk = invert_video(tiny_model, small_frames(2), steps=2, record=RecordSpec(self_probs=True, max_tokens=16,
                                                                                storage="disk", folder=str(tmp_path)))
    assert disk.store.storage == "disk" and sorted(disk.store.keys()) == sorted(cpu.store.keys())
    assert all(torch.equal(disk.store.get(*k), cpu.store.get(*k)) for k in cpu.store.keys())


def test_an_unknown_feature_module_is_refused(tiny_model):
    with pytest.raises(ValueError, match="no module 'up_blocks.9.resnets.0'"):
        invert_video(tiny_model, small_frames(2), steps=2, record=RecordSpec(features=("up_blocks.9.resnets.0",)))


def test_self_attention_under_all_frames_needs_one_chunk(tiny_model):
    with pytest.raises(ValueError, match="raise chunk_size"):
        invert_video(tiny_model, small_frames(4), steps=2, record=RecordSpec(self_probs=True), attention="all",
                     chunk_size=2)  # chunks (0, 1) and (0, 2, 3): 2 and 3 key frames


# --- FateZero's default recording on SD-1.5 ------------------------------------------------------

# methods.md §0.1 at 512x512: (query tokens, heads, number of attention blocks) for the levels <= 32x32
SD15_SMALL_LEVELS = [(1024, 8, 5), (256, 8, 5), (64, 8, 1)]


def sd15_meta_unet():
    config = json.loads((Path(SD15_CONFIG_DIR) / "unet" / "config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def fatezero_bytes(key_frames, max_tokens=1024, frames=8, steps=50, text=77):
    """The closed form of methods.md §3: steps x sum over layers of F*heads*Nq*Nk*2 B, self and cross."""
    per = sum(count * heads * n * (key_frames * n + text) for n, heads, count in SD15_SMALL_LEVELS if n <= max_tokens)
    return per * frames * steps * 2


def fatezero(max_tokens=1024, steps=50):
    return RecordSpec(self_probs=True, cross_probs=True, max_tokens=max_tokens), steps


@pytest.mark.parametrize("attention, key_frames", [("first", 1), ("first+previous", 2)])
def test_fatezero_recording_on_sd15_by_the_code_s_own_accounting(attention, key_frames):
    unet = sd15_meta_unet()
    assert len(unet.attn_processors) == 32
    spec, steps = fatezero()
    full = estimate_bytes(spec, unet, 8, 512, 512, steps, attention)
    assert full == fatezero_bytes(key_frames)
    # about 36 GiB with one key frame ('mid' or 'first'), 69 GiB with sparse-causal [first, previous]
    assert full > 4 * GiB
    spec256, _ = fatezero(max_tokens=256)
    small = estimate_bytes(spec256, unet, 8, 512, 512, steps, attention)
    assert small == fatezero_bytes(key_frames, max_tokens=256)
    # dropping the 32x32 level fits the 4 GiB budget with one key frame only (2.6 vs 4.6 GiB)
    assert (small <= 4 * GiB) == (key_frames == 1)
