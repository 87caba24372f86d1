"""Temporal hooks: Rerender fusion, ControlVideo smoother, T2V-Zero motion start (methods.md §6 D7, E1-E6)."""

from pathlib import Path

import pytest
import torch

from comfyui_video_edit.pipelines_core.flow.warp import FlowField, warp_error
from comfyui_video_edit.pipelines_core.flow.estimate import estimate_flow, translation_flow
from comfyui_video_edit.pipelines_core.methods.rerender import (
    adain, adain_hook, channel_stats, flows_to_first, keep_model_eps_hook, latent_renoise_mask,
    noise_rescale, pixel_fusion_targets, renoise_blend_hook, target_latents, x0_warp_fusion_hook,
)
from comfyui_video_edit.pipelines_core.models.model import decode_latents, encode_frames
from comfyui_video_edit.pipelines_core.methods.text2video_zero import (
    motion_dynamics_start, nearest_step, paper_timestep, warp_first_frame,
)
from comfyui_video_edit.pipelines_core.sampling.chunks import plan_chunks
from comfyui_video_edit.pipelines_core.sampling.denoiser import VideoDenoiser
from comfyui_video_edit.pipelines_core.sampling.hooks import Hooks, StepState
from comfyui_video_edit.pipelines_core.sampling.windows import StepWindow
from comfyui_video_edit.pipelines_core.sampling.loop import denoise_loop
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings
from comfyui_video_edit.pipelines_core.sampling.schedulers import make_scheduler
from comfyui_video_edit.pipelines_core.methods.controlvideo import (
    average_interpolator, flow_interpolator, interleaved_smoother_hook, smoothing_steps,
)
from comfyui_video_edit.pipelines_core.models.tiny import SD_SCHEDULER_CONFIG
from comfyui_video_edit.pipelines_core.video.decode import load_video

ASSETS = Path(__file__).resolve().parents[1] / "assets"
PROMPT = "a watercolour painting"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ddim(steps: int):
    scheduler = make_scheduler("ddim", SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    return scheduler


def x0_state(x0: torch.Tensor, index: int = 0, total: int = 10) -> StepState:
    return StepState(index, torch.tensor(500), total, torch.zeros_like(x0), torch.zeros_like(x0), x0)


def panning_latents(frames: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Latent clip whose content moves right by one cell per frame: frame[k+1](x) = frame[k](x - 1)."""
    big = torch.randn(1, 4, h, w + frames, generator=gen(seed))
    return torch.cat([big[..., frames - k:frames - k + w] for k in range(frames)])


# ------------------------------------------------------------------------ E5: step windows

def in_window(index, total, start, end):
    return StepWindow(start, end).active(index, total)


def test_E5_window_is_start_inclusive_end_exclusive():
    assert [i for i in range(20) if in_window(i, 20, 0.0, 0.1)] == [0, 1]
    assert [i for i in range(20) if in_window(i, 20, 0.5, 0.8)] == list(range(10, 16))
    assert [i for i in range(50) if in_window(i, 50, 0.8, 1.0)] == list(range(40, 50))
    assert not any(in_window(i, 20, 0.0, 0.0) for i in range(20))
    assert not any(in_window(i, 20, 1.0, 1.0) for i in range(20))  # Rerender's "off" ada_period
    assert all(in_window(i, 7, 0.0, 1.0) for i in range(7))


@pytest.mark.parametrize("make", [
    lambda start, end: adain_hook(start, end),
    lambda start, end: x0_warp_fusion_hook(translation_flow(4, 32, 48, 8, 0), start, end),
])
def test_E5_x0_hooks_act_only_inside_their_window(make):
    x0 = torch.randn(4, 4, 4, 6, generator=gen(1)) * torch.arange(1.0, 5.0).view(4, 1, 1, 1)
    hook = make(0.25, 0.5)
    changed = [i for i in range(8) if not torch.equal(hook(x0_state(x0, i, 8)), x0)]
    assert changed == [2, 3]


# ------------------------------------------------------------------------ E3: AdaIN

def test_E3_adain_identity_and_reference_statistics():
    x = torch.randn(3, 4, 9, 7, generator=gen(2)) * 2 + 1
    ref = torch.randn(1, 4, 5, 6, generator=gen(3)) * torch.tensor([0.5, 1, 2, 3]).view(1, 4, 1, 1) - 2
    assert (adain(x, x) - x).abs().max() <= 1e-5
    out_mean, out_std = channel_stats(adain(x, ref), eps=0.0)
    ref_mean, ref_std = channel_stats(ref, eps=0.0)
    assert (out_mean - ref_mean).abs().max() <= 1e-5
    assert ((out_std - ref_std) / ref_std).abs().max() <= 1e-4


def test_E3_adain_hook_keeps_frame_0_and_matches_later_frames_to_it():
    x0 = torch.randn(3, 4, 8, 8, generator=gen(4)) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1, 1)
    out = adain_hook(0.0, 1.0)(x0_state(x0))
    assert torch.equal(out[0], x0[0])
    mean0, std0 = channel_stats(x0[:1])
    mean, std = channel_stats(out[1:])
    assert (mean - mean0).abs().max() <= 1e-5 and (std - std0).abs().max() <= 1e-4
    assert (out[1:] - x0[1:]).abs().max() > 0.1


# ------------------------------------------------------------------------ shape-aware fusion (x̂0 warp)

def test_warp_fusion_leaves_a_clip_that_moves_with_the_flow_unchanged():
    x0 = panning_latents(4, 6, 8)
    flow = translation_flow(4, 48, 64, 8, 0)  # one latent cell per frame, rightwards
    for kwargs in ({}, {"chained": True}, {"use_first": True}):
        out = x0_warp_fusion_hook(flow, 0.0, 1.0, **kwargs)(x0_state(x0))
        assert (out - x0).abs().max() <= 1e-5, kwargs


def test_warp_fusion_takes_the_reference_where_visible_and_keeps_x0_where_occluded():
    flow = translation_flow(4, 48, 64, 8, 0)
    x0 = torch.randn(4, 4, 6, 8, generator=gen(5))  # frames unrelated to the flow
    plain = x0_warp_fusion_hook(flow, 0.0, 1.0)(x0_state(x0))
    chained = x0_warp_fusion_hook(flow, 0.0, 1.0, chained=True)(x0_state(x0))
    first = x0_warp_fusion_hook(flow, 0.0, 1.0, use_first=True)(x0_state(x0))
    for out in (plain, chained, first):
        assert torch.equal(out[0], x0[0])
        assert torch.equal(out[..., 0], x0[..., 0])  # the column entering the frame has no reference
    inner = slice(4, 8)  # columns far enough from the entering edge to be trusted for every frame
    # Rerender's reference: the previous frame's x̂0 as the model predicted it, moved one cell
    assert torch.equal(plain[2, ..., inner], x0[1, ..., 3:7])
    assert torch.equal(chained[2, ..., inner], x0[0, ..., 2:6])  # the fused frame 1 carries frame 0 on
    assert torch.equal(first[3, ..., inner], x0[0, ..., 1:5])


def test_flows_to_first_chain_the_translation():
    flow = translation_flow(4, 24, 40, 3, 0)
    to_first, occ_first = flows_to_first(flow)
    for k in range(3):
        assert (to_first[k, 0, :, 12:] + 3 * (k + 1)).abs().max() <= 1e-4
        assert occ_first[k, :, :3 * (k + 1)].min() == 1 and occ_first[k, :, 3 * (k + 1) + 1:].max() == 0


def test_warp_fusion_refuses_a_flow_of_another_clip():
    hook = x0_warp_fusion_hook(translation_flow(3, 48, 64, 8, 0), 0.0, 1.0)
    with pytest.raises(ValueError, match="estimate the flow on the clip being edited"):
        hook(x0_state(torch.randn(4, 4, 6, 8)))


def test_keep_model_eps_makes_the_step_use_the_fused_x0_with_the_model_eps():
    scheduler = ddim(5)
    x = torch.randn(2, 4, 3, 3, generator=gen(6))
    delta = torch.randn_like(x)

    def denoise(latents, state):
        return 0.3 * latents + 0.1

    def shift(state):
        return state.x0 + delta

    t, t_next = scheduler.timesteps[0], scheduler.timesteps[1]
    a, a_next = scheduler.alphas_cumprod[int(t)], scheduler.alphas_cumprod[int(t_next)]
    eps = denoise(x, None)
    fused = (x - (1 - a).sqrt() * eps) / a.sqrt() + delta
    expected = a_next.sqrt() * fused + (1 - a_next).sqrt() * eps  # Rerender's / ControlVideo's DDIM step
    kept = denoise_loop(denoise, x, scheduler, "ddim", scheduler.timesteps[:1],
                        Hooks(on_x0=[shift, keep_model_eps_hook()]))
    rederived = denoise_loop(denoise, x, scheduler, "ddim", scheduler.timesteps[:1], Hooks(on_x0=[shift]))
    assert (kept - expected).abs().max() <= 1e-4
    assert (rederived - expected).abs().max() > 1e-2  # the loop alone moves less
    plain = denoise_loop(denoise, x, scheduler, "ddim", scheduler.timesteps[:2])
    untouched = denoise_loop(denoise, x, scheduler, "ddim", scheduler.timesteps[:2],
                             Hooks(on_x0=[keep_model_eps_hook()]))
    assert (plain - untouched).abs().max() <= 1e-5  # only the loop's eps re-derivation rounds


def test_keep_model_eps_with_euler_started_mid_grid():
    """SDEdit-style run (begin_index 2): the hook reads the run's scheduler at the step's position (2, not 0)."""
    scheduler = make_scheduler("euler", SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(2)
    x = torch.randn(1, 4, 3, 3, generator=gen(7)) * scheduler.sigmas[2]
    delta = torch.randn_like(x)
    kept = denoise_loop(lambda lat, st: 0.2 * lat, x, scheduler, "euler", scheduler.timesteps[2:3],
                        Hooks(on_x0=[lambda st: st.x0 + delta, keep_model_eps_hook()]))
    sigma, sigma_next = scheduler.sigmas[2], scheduler.sigmas[3]
    scheduler_eps = 0.2 * x / (sigma**2 + 1).sqrt()  # the model sees Euler's scaled input
    expected = x - sigma * scheduler_eps + delta + sigma_next * scheduler_eps
    assert (kept - expected).abs().max() <= 1e-4


# ------------------------------------------------------------------------ E1: pixel-aware fusion targets

def still_flow(frames: int, h: int, w: int, occluded: float) -> FlowField:
    zeros = torch.zeros(frames - 1, 2, h, w)
    occ = torch.full((frames - 1, h, w), occluded)
    return FlowField(zeros, zeros.clone(), occ, occ.clone(), "test")


def test_E1_pixel_fusion_with_everything_occluded_returns_the_direct_frames():
    direct = torch.rand(3, 24, 32, 3, generator=gen(8))
    targets, masks = pixel_fusion_targets(direct, still_flow(3, 24, 32, 1.0))
    assert (targets - direct).abs().max() <= 1e-6
    assert masks.abs().max() == 0  # nothing to re-sample toward


def test_E1_pixel_fusion_with_nothing_occluded_and_consistent_frames_returns_direct():
    direct = torch.rand(1, 24, 32, 3, generator=gen(9)).expand(4, -1, -1, -1).contiguous()
    targets, masks = pixel_fusion_targets(direct, still_flow(4, 24, 32, 0.0))
    assert (targets - direct).abs().max() <= 1e-5
    assert masks[0].max() == 0 and masks[1:].min() == 1


def test_pixel_fusion_replaces_visible_content_by_the_warped_references():
    direct = torch.rand(3, 24, 32, 3, generator=gen(10))  # inconsistent frames, no occlusion
    targets, _ = pixel_fusion_targets(direct, still_flow(3, 24, 32, 0.0))
    assert (targets - direct[:1]).abs().max() <= 1e-5  # every frame takes frame 0's content
    # a pan: inside the visible part, frame 2's target is frame 0 moved twice
    flow = translation_flow(3, 24, 40, 2, 0)
    targets, masks = pixel_fusion_targets(direct[:, :, :8].repeat(1, 1, 5, 1), flow)
    assert (targets[2, :, 12:] - targets[0, :, 8:-4]).abs().max() <= 1e-4
    assert masks[2, :, :4].max() < 1 and masks[2, :, 16:].min() == 1


# ------------------------------------------------------------------------ E2: re-noise blend

def test_E2_zero_weight_leaves_latents_unchanged_and_r_is_in_range():
    scheduler = ddim(10)
    target = torch.randn(3, 4, 4, 4, generator=gen(11))
    masks = torch.rand(3, 4, 4, generator=gen(12))
    x = torch.randn(3, 4, 4, 4, generator=gen(13))
    state = StepState(5, scheduler.timesteps[5], 10, x, torch.randn_like(x), scheduler=scheduler, position=5)
    for hook in (renoise_blend_hook(target, masks, 0.0, 1.0, strength=0.0),
                 renoise_blend_hook(target, torch.zeros_like(masks), 0.0, 1.0)):
        assert torch.equal(hook(state), x)
    w = torch.linspace(0, 1, 101)
    for inner in (0.0, 0.5, 0.9, 1.0):
        for flat in (None, (torch.arange(101) % 2).float()):
            r = noise_rescale(w, inner, flat)
            assert (r >= (1 - w).clamp(min=0) - 1e-7).all() and (r <= 1 + 1e-7).all()


def test_re_noise_with_full_weight_lands_on_the_noised_target():
    """w = 1, r = 0: x_t' becomes q(x_trg, t') for the timestep the DDIM step moved to (scheduler.add_noise)."""
    scheduler = ddim(10)
    target = torch.randn(2, 4, 4, 4, generator=gen(14))
    x = torch.randn_like(target)
    hook = renoise_blend_hook(target, torch.ones(2, 4, 4), 0.0, 1.0, strength=1.0, inner_strength=0.0,
                              smooth_boundary=False, seed=3)
    state = StepState(4, scheduler.timesteps[4], 10, x, torch.randn_like(x), scheduler=scheduler, position=4)
    z = torch.randn(x.shape, generator=gen(3 * 1_000_003 + 5))
    expected = scheduler.add_noise(target, z, scheduler.timesteps[5:6])
    assert (hook(state) - expected).abs().max() <= 1e-5


def test_re_noise_window_counts_the_step_it_prepares():
    scheduler = ddim(10)
    target, masks = torch.randn(2, 4, 4, 4), torch.ones(2, 4, 4)
    hook = renoise_blend_hook(target, masks, 0.5, 0.8)
    x = torch.randn_like(target)
    active = [i for i in range(10)
              if not torch.equal(hook(StepState(i, scheduler.timesteps[i], 10, x, x, scheduler=scheduler, position=i)), x)]
    assert active == [4, 5, 6]  # it prepares steps 5, 6, 7


def test_latent_renoise_mask_trusts_a_cell_only_if_all_its_pixels_are_trusted():
    masks = torch.ones(1, 16, 16)
    masks[0, 3, 12] = 0.5
    assert latent_renoise_mask(masks).tolist() == [[[1.0, 0.5], [1.0, 1.0]]]


def test_fidelity_compensation_brings_the_decoded_target_closer():
    def encode(image):  # a lossless-on-8x8-blocks codec ...
        pooled = torch.nn.functional.avg_pool2d(image.permute(0, 3, 1, 2), 8)
        return torch.cat([pooled, pooled[:, :1]], 1)

    def decode(latents):  # ... whose decoder loses 10% contrast
        return 0.9 * torch.nn.functional.interpolate(latents[:, :3], scale_factor=8).permute(0, 2, 3, 1)

    blocks = torch.rand(2, 3, 4, 3, generator=gen(15)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    plain = (decode(encode(blocks)) - blocks).abs().mean()
    compensated = (decode(target_latents(encode, decode, blocks)) - blocks).abs().mean()
    assert compensated < 0.2 * plain


# ------------------------------------------------------------------------ E6: ControlVideo smoother

def exact_codec():
    return (lambda z: z.permute(0, 2, 3, 1)), (lambda image: image.permute(0, 3, 1, 2))


@pytest.mark.parametrize("interpolate", [average_interpolator, flow_interpolator()])
def test_E6_smoother_leaves_a_constant_video_unchanged(interpolate):
    decode, encode = exact_codec()
    x0 = torch.rand(1, 3, 32, 40, generator=gen(16)).expand(5, -1, -1, -1).contiguous()
    hook = interleaved_smoother_hook(decode, encode, steps=(2, 3), interpolate=interpolate)
    for index in range(6):
        assert (hook(x0_state(x0, index, 6)) - x0).abs().max() <= 1e-5


def test_smoother_replaces_odd_then_even_interior_frames():
    decode, encode = exact_codec()
    x0 = torch.rand(6, 3, 4, 4, generator=gen(17))
    hook = interleaved_smoother_hook(decode, encode, steps=(2, 3), interpolate=average_interpolator)
    first, second, other = (hook(x0_state(x0, i, 6)) for i in (2, 3, 4))
    assert torch.equal(other, x0)
    for k in range(6):
        mean = (x0[k - 1] + x0[(k + 1) % 6]) / 2
        odd_interior, even_interior = k in (1, 3), k in (2, 4)
        assert torch.allclose(first[k], mean if odd_interior else x0[k], atol=1e-6), k
        assert torch.allclose(second[k], mean if even_interior else x0[k], atol=1e-6), k


def test_smoothing_steps_are_controlvideos_and_scale_with_the_run():
    controlvideo = tuple(i for i in range(50) if 50 - i in (19, 20))
    assert smoothing_steps(50) == controlvideo == (30, 31)
    assert smoothing_steps(20) == (12, 13)
    for total in range(2, 60):
        first, second = smoothing_steps(total)
        assert 0 <= first and second == first + 1 and second < total


def test_flow_interpolation_recovers_the_middle_frame_of_a_pan():
    frames, _, _ = load_video(ASSETS / "sample_pan.mp4", frame_cap=3)
    middle = flow_interpolator()(frames[:1], frames[2:])
    inner = (slice(16, -16), slice(16, -16))
    flow_error = (middle[0] - frames[1])[inner].abs().mean()
    mean_error = (average_interpolator(frames[:1], frames[2:])[0] - frames[1])[inner].abs().mean()
    assert flow_error < 0.5 * mean_error, (flow_error, mean_error)


# ------------------------------------------------------------------------ D7: T2V-Zero motion start

def test_paper_steps_map_to_t2v_zero_timesteps():
    assert paper_timestep(ddim(50), 47) == 941 and paper_timestep(ddim(50), 44) == 881
    scheduler = ddim(50)
    assert nearest_step(scheduler.timesteps, 941) == 2 and nearest_step(scheduler.timesteps, 881) == 5
    coarse = ddim(20)  # grid 951, 901, 851, ...: the nearest noise levels
    assert [int(coarse.timesteps[nearest_step(coarse.timesteps, v)]) for v in (941, 881)] == [951, 901]


def test_D7_motion_field_shifts_frame_k_by_k_cells_at_strength_8():
    first = torch.randn(1, 4, 64, 64, generator=gen(18))
    moved = warp_first_frame(first, 4, 8.0, 8.0)
    for k in (1, 2, 3):
        assert torch.equal(moved[k - 1, :, :64 - k, :64 - k], first[0, :, k:, k:])
    assert torch.equal(warp_first_frame(first, 3, 0.0, 0.0), first.expand(2, -1, -1, -1))


def fake_denoiser(latents, state):
    return 0.2 * latents + 0.05 * torch.sin(latents)


def test_D7_motion_start_with_strength_0_and_shared_noise_gives_identical_later_frames():
    scheduler = ddim(50)
    noise = torch.randn(1, 4, 8, 8, generator=gen(19))
    latents, remaining = motion_dynamics_start(fake_denoiser, scheduler, noise, 4, 0.0, 0.0, generator=gen(1),
                                               shared_noise=True)
    assert latents.shape == (4, 4, 8, 8)
    assert torch.equal(remaining, scheduler.timesteps[2:])  # all frames continue from t1 = 941
    assert torch.equal(latents[1], latents[2]) and torch.equal(latents[1], latents[3])
    first_t1 = denoise_loop(fake_denoiser, noise, scheduler, "ddim", scheduler.timesteps[:2])
    assert torch.equal(latents[:1], first_t1)
    assert (latents[1] - latents[0]).abs().max() > 1e-2  # the others were re-noised from t0


def test_D7_motion_start_moves_frame_k_by_k_cells_before_the_noise():
    scheduler = ddim(50)
    noise = torch.randn(1, 4, 64, 64, generator=gen(20))
    latents, _ = motion_dynamics_start(fake_denoiser, scheduler, noise, 3, 8.0, 8.0, generator=gen(2),
                                       shared_noise=True)
    first_t0 = denoise_loop(fake_denoiser, noise, scheduler, "ddim", scheduler.timesteps[:5])
    a0, a1 = scheduler.alphas_cumprod[881], scheduler.alphas_cumprod[941]
    z = torch.randn(1, 4, 64, 64, generator=gen(2))
    signal = (latents[1:] - (1 - a1 / a0).sqrt() * z) / (a1 / a0).sqrt()  # undo the shared forward noise
    for k in (1, 2):
        assert (signal[k - 1, :, :64 - k, :64 - k] - first_t0[0, :, k:, k:]).abs().max() <= 1e-4


def test_motion_start_runs_with_the_sampler_denoiser(tiny_model):
    from comfyui_video_edit.pipelines_core.models.model import encode_prompt

    scheduler = make_scheduler("ddim", tiny_model.scheduler_config)
    scheduler.set_timesteps(20)  # grid 951, 901, ...: t1 -> 951 (step 0), t0 -> 901 (step 1)
    cond, uncond = encode_prompt(tiny_model, PROMPT), encode_prompt(tiny_model, "")
    first = VideoDenoiser(tiny_model.unet, cond, uncond, 7.5, plan_chunks(1, 8, "none"))
    with torch.no_grad():
        latents, remaining = motion_dynamics_start(first, scheduler, torch.randn(1, 4, 8, 8, generator=gen(3)), 3,
                                                   generator=gen(4))
    assert latents.shape == (3, 4, 8, 8) and torch.equal(remaining, scheduler.timesteps)
    with pytest.raises(ValueError, match="ddim"):
        motion_dynamics_start(first, make_scheduler("euler", tiny_model.scheduler_config), torch.randn(1, 4, 8, 8), 3)


# ------------------------------------------------------------------------ composition with edit_video

def test_hooks_compose_with_edit_video_and_leave_frame_0_alone(tiny_model):
    clip_frames = torch.rand(3, 32, 32, 3, generator=gen(21))
    settings = SamplerSettings(PROMPT, seed=5, steps=3, strength=0.7, attention="none", cfg=1.0)
    flow = translation_flow(3, 32, 32, 8, 0)
    decode = lambda z: decode_latents(tiny_model, z)  # noqa: E731
    encode = lambda image: encode_frames(tiny_model, image)  # noqa: E731
    plain = edit_video(tiny_model, settings, clip_frames)
    closed = Hooks(on_x0=[adain_hook(0, 0), x0_warp_fusion_hook(flow, 0, 0)])
    # hooks that return x̂0 untouched; the loop still re-derives eps from it, which only rounds
    assert (edit_video(tiny_model, settings, clip_frames, hooks=closed) - plain).abs().max() <= 1e-5
    variants = {  # name: (hooks, frames that change; attention "none" keeps the others independent)
        "adain + warp": (Hooks(on_x0=[adain_hook(0, 1), x0_warp_fusion_hook(flow, 0, 1),
                                      keep_model_eps_hook()]), [1, 2]),
        "smoother": (Hooks(on_x0=[interleaved_smoother_hook(decode, encode, steps=(0, 1))]), [1]),  # 0, 2 are ends
        "re-noise": (Hooks(after_step=[renoise_blend_hook(
            torch.randn(3, 4, 4, 4, generator=gen(6)), torch.tensor([0.0, 1.0, 1.0])[:, None, None].expand(3, 4, 4),
            0.0, 1.0)]), [1, 2]),
    }
    for name, (hooks, changed) in variants.items():
        diff = (edit_video(tiny_model, settings, clip_frames, hooks=hooks) - plain).abs().amax(dim=(1, 2, 3))
        assert [k for k in range(3) if diff[k] > 1e-3] == changed, (name, diff)
        assert all(diff[k] <= 1e-5 for k in range(3) if k not in changed), (name, diff)


def test_warp_fusion_and_adain_lower_the_warp_error_of_the_sample_clip(tiny_model):
    frames, _, _ = load_video(ASSETS / "sample_pan.mp4", frame_cap=4)
    flow = estimate_flow(frames)
    settings = SamplerSettings(PROMPT, seed=1, steps=4, strength=0.75, attention="none", cfg=1.0)
    plain = decode_latents(tiny_model, edit_video(tiny_model, settings, frames))
    fused_hooks = Hooks(on_x0=[adain_hook(0.0, 1.0), x0_warp_fusion_hook(flow, 0.0, 1.0)])
    fused = decode_latents(tiny_model, edit_video(tiny_model, settings, frames, hooks=fused_hooks))
    without, with_fusion = warp_error(plain, flow), warp_error(fused, flow)
    print(f"\nsample_pan warp error: without temporal features {without:.5f}, with x0 warp fusion + AdaIN "
          f"{with_fusion:.5f} (source clip {warp_error(frames, flow):.5f})")
    assert with_fusion < without
