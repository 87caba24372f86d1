"""Flow Warp engine: warping convention, occlusion, latent flow, motion field, estimators, metrics.

The D-numbers follow the flow invariants of the design notes (D1-D7).
"""

import json
from pathlib import Path

import pytest
import torch
from skimage import data as skdata

from comfyui_video_edit.pipelines_core.flow.warp import (
    FlowField,
    chain_flows,
    flow_to_image,
    interpolate_midframe,
    latent_flow,
    latent_occlusion,
    motion_field,
    occlusion_masks,
    pixel_grid,
    warp,
    warp_error,
    warp_latents_motion,
)
from comfyui_video_edit.pipelines_core.flow.estimate import estimate_flow, estimate_pair_flow, translation_flow
from comfyui_video_edit.pipelines_core.video.decode import load_video

ASSETS = Path(__file__).resolve().parents[1] / "assets"


# ---------------------------------------------------------------- helpers


def rand_images(n, c, h, w, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def constant_flow(n, h, w, dx, dy):
    return torch.tensor([float(dx), float(dy)]).view(1, 2, 1, 1).expand(n, 2, h, w).contiguous()


def shifted_reference(image, dx, dy):
    """out[y, x] = image[y + dy, x + dx] where that exists, 0 elsewhere (what warp by (dx, dy) must give)."""
    h, w = image.shape[-2:]
    out = torch.zeros_like(image)
    out[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = image[
        ..., max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
    ]
    return out


def photo(name="astronaut"):
    """A real photograph, (3, H, W) float 0..1."""
    return torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1).float() / 255


def panned_clip(dx, dy, frames, height, width, top=120, left=120, name="astronaut"):
    """IMAGE (F, H, W, 3) whose content moves by (dx, dy) px per frame: frame[k](p) = frame[0](p - k*d)."""
    source = photo(name)
    crops = [
        source[:, top - k * dy : top - k * dy + height, left - k * dx : left - k * dx + width] for k in range(frames)
    ]
    return torch.stack(crops).permute(0, 2, 3, 1).contiguous()


def interior(t, margin):
    return t[..., margin:-margin, margin:-margin]


# ---------------------------------------------------------------- D1, D2: the warp convention


def test_d1_zero_flow_is_identity():
    image = rand_images(2, 3, 17, 23)
    zero = torch.zeros(2, 2, 17, 23)
    assert torch.equal(warp(image, zero, mode="nearest"), image)
    assert (warp(image, zero) - image).abs().max() <= 1e-6


@pytest.mark.parametrize("dx,dy", [(3, 0), (-2, 5), (7, -4)])
def test_d2_integer_translation_exact_inside_zero_outside(dx, dy):
    image = rand_images(1, 3, 40, 50, seed=1) + 0.5  # no zeros in the image, so padding is visible
    flow = constant_flow(1, 40, 50, dx, dy)
    expected = shifted_reference(image, dx, dy)
    assert torch.equal(warp(image, flow, mode="nearest"), expected)
    assert (warp(image, flow) - expected).abs().max() <= 1e-5
    outside = shifted_reference(torch.ones_like(image), dx, dy) == 0
    assert outside.any() and warp(image, flow)[outside].abs().max() <= 1e-5


def test_border_padding_repeats_the_edge():
    image = rand_images(1, 1, 8, 10, seed=2)
    out = warp(image, constant_flow(1, 8, 10, 3, 0), padding="border")
    assert torch.allclose(out[..., -3:], image[..., -1:].expand(1, 1, 8, 3), atol=1e-6)


def test_warp_follows_the_flow_convention_both_ways():
    """warp(frame[i], bwd) ≈ frame[i+1] and warp(frame[i+1], fwd) ≈ frame[i] for a known pan."""
    clip = panned_clip(2, -1, 2, 48, 64).permute(0, 3, 1, 2)
    flows = translation_flow(2, 48, 64, 2, -1)
    assert (interior(warp(clip[:1], flows.bwd) - clip[1:], 4)).abs().max() <= 1e-5
    assert (interior(warp(clip[1:], flows.fwd) - clip[:1], 4)).abs().max() <= 1e-5


# ---------------------------------------------------------------- D3, D4: occlusion


def strip_mask(h, w, rows=slice(0, 0), cols=slice(0, 0)):
    mask = torch.zeros(h, w)
    mask[:, cols] = 1
    mask[rows, :] = 1
    return mask


@pytest.mark.parametrize(
    "dx,dy,leaving,entering",
    [
        (3, 0, dict(cols=slice(-3, None)), dict(cols=slice(0, 3))),
        (-2, 0, dict(cols=slice(0, 2)), dict(cols=slice(-2, None))),
        (0, 4, dict(rows=slice(-4, None)), dict(rows=slice(0, 4))),
        (2, -1, dict(cols=slice(-2, None), rows=slice(0, 1)), dict(cols=slice(0, 2), rows=slice(-1, None))),
    ],
)
def test_d3_forward_backward_check_flags_exactly_the_strips(dx, dy, leaving, entering):
    flows = translation_flow(3, 24, 30, dx, dy)
    for i in range(2):
        assert torch.equal(flows.occ_fwd[i], strip_mask(24, 30, **leaving))  # leaves the frame
        assert torch.equal(flows.occ_bwd[i], strip_mask(24, 30, **entering))  # enters the frame


@pytest.mark.parametrize("error,occluded", [(1.4, False), (1.6, True)])
def test_occlusion_uses_the_squared_form(error, occluded):
    """|f + w|^2 > 0.01(|f|^2 + |w|^2) + 0.5 with f = 10, w = -(10 - e): the bound is crossed between
    e = 1.4 and 1.6. The unsquared form |f + w| > 0.01(|f| + |w|) + 0.5 would flag e = 1.4 too."""
    fwd = constant_flow(1, 12, 12, 10, 0)
    bwd = constant_flow(1, 12, 12, -(10 - error), 0)
    occ_fwd, _ = occlusion_masks(fwd, bwd)
    centre = occ_fwd[0, 4:8, 0:1]  # pixels whose forward target stays inside the frame
    assert torch.all(centre == float(occluded))


def test_d4_moving_square_flags_the_disoccluded_strip():
    """A 32 px square moves dx px right over a static textured background (true flows)."""
    h = w = 96
    side, top, x0, dx = 32, 30, 20, 6
    fwd = torch.zeros(1, 2, h, w)
    fwd[0, 0, top : top + side, x0 : x0 + side] = dx  # square pixels of frame 0
    bwd = torch.zeros(1, 2, h, w)
    bwd[0, 0, top : top + side, x0 + dx : x0 + dx + side] = -dx  # square pixels of frame 1
    occ_fwd, occ_bwd = occlusion_masks(fwd, bwd)
    # Revealed behind the trailing edge (seen in frame 1 only) and covered at the leading edge.
    assert occ_bwd.sum() == dx * side and occ_bwd[0, top : top + side, x0 : x0 + dx].sum() == dx * side
    assert occ_fwd.sum() == dx * side and occ_fwd[0, top : top + side, x0 + side : x0 + side + dx].sum() == dx * side


# ---------------------------------------------------------------- D5: composition


def test_d5_chained_flow_equals_two_warps():
    h, w = 64, 80
    x, y = pixel_grid(h, w)[:, 0], pixel_grid(h, w)[:, 1]
    smooth = torch.stack([torch.sin(x / 6) * torch.cos(y / 9), torch.cos((x + y) / 11), torch.sin(y / 7)], 1)
    flow_ab = torch.stack([2.5 * torch.sin(y / 10), 1.5 * torch.cos(x / 13)], 1)
    flow_bc = torch.stack([-1.7 * torch.cos(y / 12 + x / 20), 2.2 * torch.sin(x / 9)], 1)
    twice = warp(warp(smooth, flow_bc), flow_ab)
    chained_error = interior(twice - warp(smooth, chain_flows(flow_ab, flow_bc)), 8).abs().max()
    summed_error = interior(twice - warp(smooth, flow_ab + flow_bc), 8).abs().max()
    assert chained_error < 0.02 and summed_error > 5 * chained_error


def test_d5_chained_integer_shifts_are_exact():
    image = rand_images(1, 3, 32, 40, seed=3)
    a, b = constant_flow(1, 32, 40, 3, -2), constant_flow(1, 32, 40, -1, 4)
    chained = chain_flows(a, b)
    assert torch.allclose(chained, constant_flow(1, 32, 40, 2, 2), atol=1e-5)
    assert interior(warp(warp(image, b), a) - warp(image, chained), 6).abs().max() <= 1e-5


# ---------------------------------------------------------------- D6: latent flow


@pytest.mark.parametrize("k", [1, 2, -3])
def test_d6_pixel_shift_8k_is_k_latent_cells(k):
    flow = constant_flow(2, 64, 48, 8 * k, -8 * k)
    cells = latent_flow(flow)
    assert cells.shape == (2, 2, 8, 6) and torch.equal(cells, constant_flow(2, 8, 6, k, -k))
    latent = rand_images(2, 4, 8, 6, seed=4)
    assert torch.equal(warp(latent, cells, mode="nearest"), shifted_reference(latent, k, -k))


def test_latent_flow_averages_and_latent_occlusion_max_pools():
    flow = torch.zeros(1, 2, 16, 16)
    flow[0, 0, :8, :4] = 8.0  # half of cell (0, 0) moves one cell
    assert latent_flow(flow)[0, 0, 0, 0] == 0.5 and latent_flow(flow)[0, 0].sum() == 0.5
    occ = torch.zeros(1, 16, 16)
    occ[0, 9, 3] = 1  # one pixel in cell (1, 0)
    assert torch.equal(latent_occlusion(occ), torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]))
    with pytest.raises(ValueError, match="multiple of 8"):
        latent_flow(torch.zeros(1, 2, 20, 16))


# ---------------------------------------------------------------- D7: Text2Video-Zero motion field


def test_d7_motion_strength_zero_is_identity():
    latent = rand_images(4, 4, 64, 64, seed=5)
    field = motion_field(4, 64, 64, 0, 0)
    assert torch.equal(warp_latents_motion(latent, field), latent)


def test_d7_strength_8_shifts_frame_k_by_k_cells_from_x_plus_k():
    frames, size = 4, 64  # 512 px
    latent = rand_images(1, 4, size, size, seed=6).expand(frames, 4, size, size)
    moved = warp_latents_motion(latent, motion_field(frames, size, size, 8, 8))
    for k in range(frames):
        assert torch.equal(moved[k, :, : size - k, : size - k], latent[k, :, k:, k:])
    half = warp_latents_motion(latent.half(), motion_field(frames, size, size, 8, 8))
    assert half.dtype == torch.float16 and torch.equal(half, moved.half())


def test_motion_field_reflects_the_revealed_band_and_scales_with_size():
    latent = rand_images(3, 2, 8, 32, seed=7)  # 256 px wide: strength 16 is one cell per frame
    field = motion_field(3, 8, 32, strength_x=16, strength_y=0)
    assert torch.equal(field[:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0])) and field[:, 1].abs().max() == 0
    moved = warp_latents_motion(latent, field)
    k, last = 2, 31
    for x in range(last - k + 1, last + 1):  # x + k runs off the right edge: mirrored about the last cell
        assert torch.equal(moved[k, :, :, x], latent[k, :, :, 2 * last - (x + k)])


def test_motion_field_uses_global_frame_ids():
    field = motion_field(3, 64, 64, 8, 8, frame_ids=[0, 5, 6])
    assert torch.equal(field[:, 0, 0, 0], torch.tensor([0.0, 5.0, 6.0]))
    with pytest.raises(ValueError):
        motion_field(3, 64, 64, frame_ids=[0, 1])


# ---------------------------------------------------------------- estimators


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_estimators_recover_a_known_translation(method):
    dx, dy = 3, -2
    clip = panned_clip(dx, dy, 2, 192, 256)
    flows = estimate_flow(clip, method)
    epe_fwd = interior((flows.fwd - constant_flow(1, 192, 256, dx, dy)).norm(dim=1), 16).mean()
    epe_bwd = interior((flows.bwd - constant_flow(1, 192, 256, -dx, -dy)).norm(dim=1), 16).mean()
    assert epe_fwd < 0.5 and epe_bwd < 0.5, (epe_fwd, epe_bwd)
    assert interior(flows.occ_fwd, 16).mean() < 0.1  # a consistent translation is mostly visible


@pytest.fixture(scope="module")
def sample_pan():
    """The bundled clip (an H.264 pan over a photograph) and its known per-frame flow."""
    facts = json.loads((ASSETS / "sample_pan.json").read_text())
    frames, _, _ = load_video(ASSETS / "sample_pan.mp4")
    fwd = facts["forward_flow_px"]  # frame_k(x, y) == frame_k+1(x + u, y + v): our fwd convention
    return frames, (fwd["u"], fwd["v"])


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_sample_clip_end_point_error(sample_pan, method):
    frames, (u, v) = sample_pan
    flows = estimate_flow(frames, method)
    pairs, _, h, w = flows.fwd.shape
    epe_fwd = float(interior((flows.fwd - constant_flow(pairs, h, w, u, v)).norm(dim=1), 16).mean())
    epe_bwd = float(interior((flows.bwd - constant_flow(pairs, h, w, -u, -v)).norm(dim=1), 16).mean())
    print(f"\nsample_pan.mp4 {method}: mean EPE fwd {epe_fwd:.3f} px, bwd {epe_bwd:.3f} px (16 px margin)")
    assert epe_fwd < 1.0 and epe_bwd < 1.0
    frame_from_next = warp(frames[1:].permute(0, 3, 1, 2), flows.fwd)  # warp(frame k+1, fwd k) ≈ frame k
    assert interior(frame_from_next - frames[:-1].permute(0, 3, 1, 2), 16).abs().mean() < 0.015


def test_estimate_flow_shapes_progress_and_single_frame():
    clip = torch.rand(4, 40, 56, 3, generator=torch.Generator().manual_seed(8))
    calls = []
    flows = estimate_flow(clip, progress=lambda done, total: calls.append((done, total)))
    assert flows.fwd.shape == flows.bwd.shape == (3, 2, 40, 56) and flows.fwd.dtype == torch.float32
    assert flows.occ_fwd.shape == flows.occ_bwd.shape == (3, 40, 56)
    assert calls[-1] == (6, 6) and len(calls) == 6
    assert "dis" in repr(flows) and "frames=4" in repr(flows)
    single = estimate_flow(clip[:1])
    assert single.fwd.shape == (0, 2, 40, 56) and single.occ_bwd.shape == (0, 40, 56)
    with pytest.raises(ValueError, match="unknown flow method"):
        estimate_flow(clip, "rife")
    with pytest.raises(ValueError, match=r"\(frames, height, width, 3\)"):
        estimate_flow(clip.permute(0, 3, 1, 2))


def test_pair_flow_between_non_consecutive_frames():
    clip = panned_clip(2, 1, 3, 96, 128)
    skip = estimate_pair_flow(clip[:1], clip[2:])  # frame 0 -> frame 2: twice the per-frame motion
    assert interior((skip - constant_flow(1, 96, 128, 4, 2)).norm(dim=1), 16).mean() < 0.5


def test_raft_needs_a_local_weights_file(tmp_path):
    clip = torch.rand(2, 32, 32, 3)
    missing = tmp_path / "raft_large.pth"
    with pytest.raises(FileNotFoundError, match="raft_large.pth"):
        estimate_flow(clip, "raft", raft_weights=missing)
    with pytest.raises(ValueError, match="needs a RAFT weights file"):
        estimate_flow(clip, "raft")
    not_raft = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, not_raft)
    with pytest.raises(ValueError, match="not a torchvision RAFT"):
        estimate_flow(clip, "raft", raft_weights=not_raft)


def test_raft_runs_from_a_weights_file_on_small_frames(tmp_path):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    weights = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), weights)
    clip = torch.rand(3, 44, 60, 3)  # smaller than RAFT's 128 px minimum, not a multiple of 8
    flows = estimate_flow(clip, "raft", raft_weights=weights, device="cpu")
    assert flows.fwd.shape == (2, 2, 44, 60) and torch.isfinite(flows.fwd).all() and flows.method == "raft"


# ---------------------------------------------------------------- flow field, preview


def test_translation_flow_field():
    flows = translation_flow(5, 16, 24, 2, -1)
    assert flows.fwd.shape == (4, 2, 16, 24) and torch.equal(flows.bwd, -flows.fwd)
    assert torch.equal(flows.fwd[:, :, 3, 5], torch.tensor([[2.0, -1.0]] * 4))
    assert translation_flow(1, 16, 24, 2, 0).fwd.shape == (0, 2, 16, 24)


def test_flow_field_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        FlowField(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8), torch.zeros(2, 8, 9), torch.zeros(2, 8, 8), "x")


def test_flow_to_image_colours():
    flow = torch.zeros(2, 2, 4, 4)
    flow[0, 0, 0, 0] = 4.0  # +x at full scale
    flow[0, 0, 0, 1] = -4.0  # -x
    flow[1, 1, 0, 0] = 2.0  # +y at half the batch's largest magnitude
    rgb = flow_to_image(flow)
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert torch.allclose(rgb[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # red
    assert torch.allclose(rgb[0, 0, 1], torch.tensor([0.0, 1.0, 1.0]))  # opposite hue: cyan
    assert torch.allclose(rgb[0, 1, 1], torch.ones(3))  # still: white
    assert 0.4 < 1 - rgb[1, 0, 0].min() < 0.6  # half saturation: one scale for the whole clip
    assert flow_to_image(torch.zeros(0, 2, 4, 4)).shape == (0, 4, 4, 3)


# ---------------------------------------------------------------- interpolation


def test_interpolation_of_a_still_video_is_the_frame():
    frames = rand_images(3, 3, 32, 40, seed=9)
    zero = torch.zeros(3, 2, 32, 40)
    assert (interpolate_midframe(frames, frames, zero, zero) - frames).abs().max() <= 1e-5


def test_interpolation_lands_half_way_and_uses_the_side_that_sees_the_edge():
    clip = panned_clip(4, 0, 3, 48, 64).permute(0, 3, 1, 2)  # 4 px per frame; frame 1 is the middle
    prev, middle, next_ = clip[:1], clip[1:2], clip[2:3]
    flows = translation_flow(2, 48, 64, 8, 0)
    mid = interpolate_midframe(prev, next_, flows.fwd, flows.bwd)
    assert (mid - middle).abs().max() <= 1e-5  # whole frame, the entering and leaving strips included
    plain_average = (prev + next_) / 2
    assert (plain_average - middle).abs().mean() > 100 * (mid - middle).abs().mean()


# ---------------------------------------------------------------- warp error


def test_warp_error_is_zero_for_a_video_that_follows_the_flow():
    source = panned_clip(3, 1, 5, 64, 80)
    flows = translation_flow(5, 64, 80, 3, 1)
    assert warp_error(source, flows) < 1e-10
    # An edit that keeps the motion (a colour change) is just as consistent.
    assert warp_error(1 - source.flip(-1), flows) < 1e-10


def test_warp_error_grows_with_flicker():
    source = panned_clip(3, 1, 5, 64, 80)
    flows = estimate_flow(source)
    steady = warp_error(source, flows)
    flicker = source * torch.tensor([1.0, 0.7, 1.0, 0.7, 1.0]).view(5, 1, 1, 1)
    assert steady < 1e-3 and warp_error(flicker, flows) > 10 * steady + 1e-3


def test_warp_error_checks_sizes():
    flows = translation_flow(3, 16, 16, 1, 0)
    with pytest.raises(ValueError, match="does not match the flow"):
        warp_error(torch.rand(4, 16, 16, 3), flows)
    assert warp_error(torch.rand(1, 16, 16, 3), translation_flow(1, 16, 16, 1, 0)) == 0.0
