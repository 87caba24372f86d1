"""Rerender-A-Video's temporal fusion as sampler hooks (Yang et al., SIGGRAPH Asia 2023).

Rerender renders keyframes one after another; here all frames are denoised in one batch, so each
fusion runs causally in frame order inside one step. The pieces (methods.md §2.3):

* AdaIN colour consistency (`adain_hook`, on_x0): every frame's x̂0 takes frame 0's channel statistics.
* Shape-aware fusion (`x0_warp_fusion_hook`, on_x0): x̂0 of frame k+1 is replaced by the warped x̂0
  of its reference frame wherever the flow is trusted.
* Pixel-aware fusion, a second pass: `pixel_fusion_targets` fuses the first pass's decoded frames
  into targets, `target_latents` encodes them with Rerender's fidelity compensation,
  `latent_renoise_mask` brings the masks to latent cells, and `renoise_blend_hook` (after_step)
  pulls the second pass's latents toward the noised targets.
* `keep_model_eps_hook` (on_x0, marked to run last): makes a step move the way Rerender's and
  ControlVideo's DDIM code does after an x̂0 change (see its docstring).

Rerender's order within a step is AdaIN, then the warp: Hooks(on_x0=[adain_hook(...),
x0_warp_fusion_hook(...), keep_model_eps_hook()]). Hooks that need the scheduler read the run's own
from the step (`StepState.scheduler`, `StepState.position`).

Step windows (`sampling.windows.StepWindow`). A window (start, end), fractions of the steps in this
run, is active at step index i (0-based) when start <= i / total < end. So (0, 0) never fires, (0, 1)
always does, and (1, 1) is off, as Rerender's default ada_period (1, 1) is. Rerender's own tests differ at the edges: its
warp_period and ada_period fire when total*start <= i <= total*end (end included: (0, 0.1) at 20
steps is steps 0-2 there, 0-1 here) and its mask_period when total*start < i < total*end ((0.5, 0.8)
at 20 steps is 11-15 there, 10-15 here). Rerender also counts steps over the whole 20-step grid
even with SDEdit, while `total` here is the number of steps the run actually takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..flow.warp import FlowField, chain_flows, image_to_nchw, latent_flow, latent_occlusion, warp
from ..sampling.hooks import Hook, StepState, last
from ..sampling.windows import StepWindow
from ..sampling.schedulers import SCHEDULERS, predicted_x0

# Rerender's occlusion-mask softening: max-pool 9 then a 9x9 Gaussian with sigma 18 (nearly a box).
MASK_GROW, MASK_BLUR, MASK_SIGMA = 9, 9, 18.0
# Fidelity compensation gives up where the compensated latent decodes 0.25 away (on -1..1) = 0.125 on 0..1.
FIDELITY_THRESHOLD = 0.125


# --- AdaIN (Rerender's colour consistency) ---------------------------------------------------------

def channel_stats(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over the spatial dims of (N, C, H, W); std = sqrt(var + eps) (biased var)."""
    mean = x.mean((-2, -1), keepdim=True)
    std = (x.var((-2, -1), keepdim=True, unbiased=False) + eps).sqrt()
    return mean, std


def adain(x: Tensor, ref: Tensor, eps: float = 1e-5) -> Tensor:
    """AdaIN (Huang & Belongie 2017): (x - mu_x) / sigma_x * sigma_ref + mu_ref, per channel.

    Rerender takes the reference std with an unbiased variance and normalises with instance_norm's
    biased one; using one estimator for both makes adain(x, x) == x.
    """
    mean, std = channel_stats(x, eps)
    ref_mean, ref_std = channel_stats(ref, eps)
    return (x - mean) / std * ref_std + ref_mean


def adain_hook(start: float = 0.8, end: float = 1.0) -> Hook:
    """on_x0: frames >= 1 take frame 0's x̂0 channel statistics of the same step; frame 0 is unchanged.

    Rerender: x̂0 <- IN(x̂0) * sigma_first + mu_first during ada_period; (0.8, 1) is its van_gogh
    config (its default (1, 1) switches AdaIN off).
    """
    window = StepWindow(start, end, "AdaIN")

    def hook(state: StepState) -> Tensor:
        x0 = state.x0
        if x0.shape[0] < 2 or not window.active(state.index, state.total):
            return x0
        return torch.cat([x0[:1], adain(x0[1:], x0[:1])])

    return hook


# --- masks and flows from the FlowField ------------------------------------------------------------

def occlusion_blend_mask(occ: Tensor) -> Tensor:
    """Rerender's soft occlusion mask: clamp(blur(maxpool9(occ)) + occ, 0, 1). occ (N, H, W) -> (N, H, W)."""
    from torchvision.transforms.functional import gaussian_blur

    grown = F.max_pool2d(occ[:, None].float(), MASK_GROW, stride=1, padding=MASK_GROW // 2)
    soft = gaussian_blur(grown, [MASK_BLUR, MASK_BLUR], [MASK_SIGMA, MASK_SIGMA])
    return (soft + occ[:, None]).clamp(0.0, 1.0)[:, 0]


def flows_to_first(flow: FlowField) -> tuple[Tensor, Tensor]:
    """Backward flows and occlusion from frame k+1 to frame 0, k = 0..F-2: (F-1, 2, H, W), (F-1, H, W).

    Chains the consecutive backward flows (chain_flows). A pixel counts as seen in frame 0 only if it
    is seen in frame k and its match there is seen in frame 0: occ_0[k] = max(occ_bwd[k],
    warp(occ_0[k-1], bwd[k])). Rerender checks frame 0 directly; chaining is the conservative stand-in.
    """
    flows, occs = [flow.bwd[:1]], [flow.occ_bwd[:1]]
    for k in range(1, flow.pairs):
        step = flow.bwd[k:k + 1]
        flows.append(chain_flows(step, flows[-1]))
        unseen_before = warp(occs[-1][:, None], step, mode="nearest")[:, 0]
        occs.append(torch.maximum(flow.occ_bwd[k:k + 1], unseen_before))
    if flow.pairs == 0:
        return flow.bwd, flow.occ_bwd
    return torch.cat(flows), torch.cat(occs)


@dataclass(frozen=True)
class LatentWarp:
    """Latent-resolution warps of frames 1..F-1 onto their reference frames (previous, or frame 0)."""

    flow: Tensor  # (F-1, 2, h, w) cells; lives on frame k+1, points into its reference
    trust: Tensor  # (F-1, 1, h, w) m: 1 where the warped reference replaces x̂0


def latent_warp(flow: FlowField, use_first: bool = False) -> LatentWarp:
    """Rerender's set_warp: flow / 8 at latent size and m = 1 - maxpool8(soft occlusion mask)."""
    bwd, occ = flows_to_first(flow) if use_first else (flow.bwd, flow.occ_bwd)
    trust = 1.0 - latent_occlusion(occlusion_blend_mask(occ))
    return LatentWarp(latent_flow(bwd), trust[:, None])


def check_matches(warps: LatentWarp, x: Tensor, name: str) -> None:
    frames, size = warps.flow.shape[0] + 1, tuple(warps.flow.shape[-2:])
    if x.shape[0] != frames or tuple(x.shape[-2:]) != size:
        raise ValueError(
            f"{name}: the flow is for {frames} frames of {size[1]}x{size[0]} latent cells but the sampler runs "
            f"{x.shape[0]} frames of {x.shape[-1]}x{x.shape[-2]}; estimate the flow on the clip being edited"
        )


# --- shape-aware fusion (x̂0 warping) --------------------------------------------------------------

def fuse_x0(x0: Tensor, reference: Tensor, flow: Tensor, trust: Tensor) -> Tensor:
    """x̂0 <- m * warp(x̂0_ref, flow) + (1 - m) * x̂0 (Rerender controller.update_x0, nearest sampling)."""
    return trust * warp(reference, flow, mode="nearest") + (1.0 - trust) * x0


def x0_warp_fusion_hook(
    flow: FlowField, start: float = 0.0, end: float = 0.1, use_first: bool = False, chained: bool = False
) -> Hook:
    """on_x0: Rerender's shape-aware fusion, frame by frame in order; frame 0 is unchanged.

    x̂0_{k+1} <- m * warp(ref, bwd[k] / 8) + (1 - m) * x̂0_{k+1}, m = 1 - maxpool8(soft occ_bwd[k]).
    ref is frame k's x̂0 at this step *before* its own fusion: Rerender stores a keyframe's x̂0 before
    update_x0 changes it (`tmp` in its controller) and the next keyframe warps that. chained=True
    warps the already-fused x̂0_k instead, which carries frame 0 down the whole clip.
    use_first=True: ref = frame 0's x̂0 through the chained flows (Rerender's `firstx0`).
    Rerender's warp_period default is (0, 0.1). Latent flows are derived once, here.
    """
    window = StepWindow(start, end, "x0 warp fusion")
    warps = latent_warp(flow, use_first)

    def hook(state: StepState) -> Tensor:
        x0 = state.x0
        if x0.shape[0] < 2 or not window.active(state.index, state.total):
            return x0
        check_matches(warps, x0, "x0 warp fusion")
        flows, trust = warps.flow.to(x0.device), warps.trust.to(x0.device, x0.dtype)
        if use_first or not chained:
            reference = x0[:1].expand_as(x0[1:]) if use_first else x0[:-1]
            return torch.cat([x0[:1], fuse_x0(x0[1:], reference, flows, trust)])
        fused = [x0[:1]]
        for k in range(x0.shape[0] - 1):
            fused.append(fuse_x0(x0[k + 1:k + 2], fused[-1], flows[k:k + 1], trust[k:k + 1]))
        return torch.cat(fused)

    return hook


# --- pixel-aware fusion, targets ---------------------------------------------------------------------

def fuse_pixels(direct: Tensor, warped_prev: Tensor, warped_first: Tensor, mask_prev: Tensor,
                mask_first: Tensor) -> Tensor:
    """Rerender's blend: b = (1 - m_pre) * warped_pre + m_pre * direct; (1 - m_0) * warped_0 + m_0 * b.

    Masks are 1 where the reference is occluded (soft); images (N, C, H, W), masks (N, 1, H, W).
    """
    blend = (1.0 - mask_prev) * warped_prev + mask_prev * direct
    return (1.0 - mask_first) * warped_first + mask_first * blend


def renoise_mask(occ_prev: Tensor, occ_first: Tensor) -> Tensor:
    """Where the second pass trusts the fused target: 1 - soft(occluded in both references).

    Rerender: occ = 1 - clamp((1 - occ_pre) + (1 - occ_0), 0, 1); mask = 1 - clamp(blur(maxpool9(occ)) + occ).
    """
    occ_both = 1.0 - ((1.0 - occ_prev) + (1.0 - occ_first)).clamp(0.0, 1.0)
    return 1.0 - occlusion_blend_mask(occ_both)


def pixel_fusion_targets(direct: Tensor, flow: FlowField) -> tuple[Tensor, Tensor]:
    """Fused targets of Rerender's second pass from the first pass's frames.

    direct: IMAGE (F, H, W, 3). Returns (targets IMAGE (F, H, W, 3), masks (F, H, W) in 0..1).
    In frame order, target_{k+1} = fuse_pixels(direct_{k+1}, warp(target_k, bwd[k]),
    warp(target_0, bwd_to_first[k]), soft(occ_bwd[k]), soft(occ_to_first[k])), with the flows to frame
    0 chained (flows_to_first) and bilinear warps as Rerender's flow_warp. The previous *target* stands
    in for Rerender's previous final result, which a batched first pass does not have yet.
    target_0 = direct_0 with mask 0: frame 0 is not re-sampled. masks[k] = renoise_mask(...), 1 where
    the target is trusted.
    """
    if direct.ndim != 4 or direct.shape[0] != flow.frame_count or tuple(direct.shape[1:3]) != flow.size:
        raise ValueError(
            f"pixel fusion: frames {tuple(direct.shape)} do not match the flow ({flow.frame_count} frames, "
            f"{flow.size[1]}x{flow.size[0]}); estimate the flow on the clip being edited"
        )
    frames = image_to_nchw(direct).float()
    bwd, occ = flow.bwd.to(frames.device), flow.occ_bwd.to(frames.device)
    bwd_first, occ_first = (t.to(frames.device) for t in flows_to_first(flow))
    mask_prev, mask_first = occlusion_blend_mask(occ)[:, None], occlusion_blend_mask(occ_first)[:, None]
    targets = [frames[:1]]
    for k in range(flow.pairs):
        warped_prev = warp(targets[k], bwd[k:k + 1])
        warped_first = warp(targets[0], bwd_first[k:k + 1])
        targets.append(fuse_pixels(frames[k + 1:k + 2], warped_prev, warped_first, mask_prev[k:k + 1],
                                   mask_first[k:k + 1]))
    masks = torch.cat([torch.zeros_like(occ[:1]), renoise_mask(occ, occ_first)]) if flow.pairs else occ.new_zeros(
        (1, *flow.size))
    return torch.cat(targets).permute(0, 2, 3, 1).to(direct.dtype), masks


def latent_renoise_mask(masks: Tensor, factor: int = 8) -> Tensor:
    """Pixel masks (F, H, W) -> latent (F, h, w): a cell is trusted only if all its pixels are
    (Rerender: 1 - maxpool8(1 - mask))."""
    return 1.0 - latent_occlusion(1.0 - masks, factor)


def target_latents(encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor], targets: Tensor) -> Tensor:
    """Rerender's fidelity-compensated encoding of the fused targets (IMAGE in, scaled latents out).

    z = E(x), z_rec = E(D(z)); x_trg = z + (1 - mask_x) * (z - z_rec), where mask_x marks cells (grown
    by a 3x3 max-pool) whose fully compensated latent z + (z - z_rec) decodes more than 0.25 (on -1..1)
    away from x. Rerender then multiplies x_trg by the re-noise mask; that is left out here, since
    the blend weight already vanishes where the mask does and the product only dims the target at
    soft mask edges.
    """
    z = encode(targets)
    z_rec = encode(decode(z))
    compensated = z + (z - z_rec)
    far = ((decode(compensated).float() - targets.float()).abs().mean(-1) > FIDELITY_THRESHOLD).float()
    far = F.interpolate(far[:, None], size=z.shape[-2:], mode="bilinear") > 0
    mask_x = F.max_pool2d(far.float(), 3, stride=1, padding=1).to(z.dtype)
    return z + (1.0 - mask_x) * (z - z_rec)


# --- pixel-aware fusion, the re-noise blend -------------------------------------------------------

def flat_region(mask: Tensor) -> Tensor:
    """1 where the mask has no 3x3 gradient (Rerender find_flat_region, replicate padding). (N, h, w)."""
    padded = F.pad(mask[:, None].float(), (1, 1, 1, 1), mode="replicate")
    kernel_x = torch.tensor([[-1.0, 0.0, 1.0]] * 3, device=mask.device)[None, None]
    grad = F.conv2d(padded, kernel_x).abs() + F.conv2d(padded, kernel_x.transpose(-1, -2)).abs()
    return (grad == 0).to(mask.dtype)[:, 0]


def noise_rescale(weight: Tensor, inner_strength: float, flat: Optional[Tensor] = None) -> Tensor:
    """r = max(1 - w, sqrt(1 - w^2) * inner_strength); with smooth_boundary, r = (1 - w)(1 - s) + r s
    for s = flat region of the mask (Rerender ddim_v_hacked). r lies in [max(1 - w, 0), 1] for w in [0, 1]."""
    rescale = torch.maximum(1.0 - weight, (1.0 - weight.square()).clamp(min=0.0).sqrt() * inner_strength)
    if flat is not None:
        rescale = (1.0 - weight) * (1.0 - flat) + rescale * flat
    return rescale


def renoise_blend(x: Tensor, target_noised: Tensor, direction: Tensor, weight: Tensor, rescale: Tensor) -> Tensor:
    """Rerender's x_t <- w * q(x_trg, t) + (1 - w) * (x_t - dir) + r * dir, written as
    x_t + w * (q - x_t) + (r - 1 + w) * dir (the same sum; exact when w = 0 and r = 1)."""
    return x + weight * (target_noised - x) + (rescale - 1.0 + weight) * direction


def scheduler_name(scheduler) -> str:
    """The pack's name for a diffusers scheduler instance (its `SCHEDULERS` key)."""
    cls = type(scheduler).__name__
    for name, kind in SCHEDULERS.items():
        if kind.cls_name == cls:
            return name
    raise ValueError(f"scheduler {cls} is not one of the pack's ({', '.join(SCHEDULERS)})")


def run_scheduler(state: StepState):
    """The run's scheduler and this step's position in its tables, as the loop hands them to hooks."""
    if state.scheduler is None or state.position is None:
        raise ValueError("this hook reads the run's scheduler: call it from the sampler's loop (StepState "
                         "without scheduler/position)")
    return state.scheduler, state.position


def next_alpha_bar(state: StepState) -> Tensor:
    """alpha_bar of the point a VP step moves to: DDIM's prev_timestep rule, else the next grid timestep."""
    scheduler, position = run_scheduler(state)
    if type(scheduler).__name__ == "DDIMScheduler":
        prev = int(state.timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        return scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    if position + 1 >= len(scheduler.timesteps):
        return torch.tensor(1.0)
    return scheduler.alphas_cumprod[int(scheduler.timesteps[position + 1])]


def next_point_scales(state: StepState) -> tuple[Tensor, Tensor]:
    """(s, n) with x_{t'} = s * x0 + n * eps for the point the step just moved to (VP: sqrt(a), sqrt(1-a);
    VE: 1, sigma')."""
    scheduler, position = run_scheduler(state)
    if SCHEDULERS[scheduler_name(scheduler)].space == "ve":
        return torch.tensor(1.0), scheduler.sigmas[position + 1]
    alpha_bar = next_alpha_bar(state)
    return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()


def renoise_blend_hook(
    target: Tensor,
    masks: Tensor,
    start: float = 0.5,
    end: float = 0.8,
    strength: float = 0.5,
    inner_strength: float = 0.9,
    smooth_boundary: bool = True,
    seed: int = 0,
) -> Hook:
    """after_step: Rerender's second-pass re-noise blend toward fused targets.

    target: latents (F, 4, h, w) (`target_latents`); masks: latent masks (F, h, w) in 0..1
    (`latent_renoise_mask`). With w = mask * strength (mask_strength), dir = n' * eps the noise term
    of the point x_{t'} the step moved to, and q(x_trg, t') = s' * x_trg + n' * z with fresh noise z:
        x_{t'} <- w * q(x_trg, t') + (1 - w) * (x_{t'} - dir) + r * dir,  r as in `noise_rescale`.
    Rerender applies this at the start of its step j = index + 1 with dir from step index, so it is
    active when start <= (index + 1) / total < end. Faithful for DDIM (eta = 0) and Euler, where
    x_{t'} - dir is exactly s' * x̂0; for DPM-Solver++ (multistep) dir is the DDIM reading of the
    step's eps. If an x̂0 hook changed the same step, eps is the loop's re-derived one, not the model's.
    z is drawn per step from a generator seeded by (seed, step), so a hook gives the same result every run.
    """
    window = StepWindow(start, end, "re-noise blend")
    if not (0.0 <= strength <= 1.0 and 0.0 <= inner_strength <= 1.0):
        raise ValueError(
            f"re-noise blend: strength ({strength}) and inner_strength ({inner_strength}) must be in [0, 1]"
        )
    if masks.ndim != 3 or target.ndim != 4 or masks.shape != (target.shape[0], *target.shape[-2:]):
        raise ValueError(
            f"re-noise blend: masks {tuple(masks.shape)} must be (F, h, w) matching target {tuple(target.shape)}"
        )
    weight = (masks.clamp(0.0, 1.0) * strength)[:, None]
    flat = flat_region(masks)[:, None] if smooth_boundary else None
    rescale = noise_rescale(weight, inner_strength, flat)

    def hook(state: StepState) -> Tensor:
        x, step = state.latents, state.index + 1
        if step >= state.total or not window.active(step, state.total):
            return x
        if x.shape != target.shape:
            raise ValueError(f"re-noise blend: target {tuple(target.shape)} does not match latents {tuple(x.shape)}")
        s, n = (v.to(x.device, x.dtype) for v in next_point_scales(state))
        g = torch.Generator("cpu").manual_seed(seed * 1_000_003 + step)
        z = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
        w, r = weight.to(x.device, x.dtype), rescale.to(x.device, x.dtype)
        return renoise_blend(x, s * target.to(x.device, x.dtype) + n * z, n * state.eps, w, r)

    return hook


# --- stepping with the model's eps ------------------------------------------------------------------

def keep_model_eps_hook() -> Hook:
    """on_x0, runs last (`hooks.last`): make the step land on s' * x̂0_new + n' * eps_model, as Rerender's
    p_sample_ddim (after controller.update_x0) and ControlVideo's smoother compute x_{t-1}.

    The loop re-derives eps from the changed x̂0 (x_t stays fixed), which moves x_{t-1} only by
    k * dx0 with k = sqrt(a') - sqrt((1 - a') a / (1 - a)) instead of sqrt(a') * dx0 (DDIM; at 50 steps
    near t = 881 that is about 1/10 of the effect). This hook returns x̂0_model + g * dx0 with
    g = sqrt(a') / k (Euler: g = sigma / (sigma - sigma')), so the loop's step ends where theirs does.
    It reads the run's scheduler from the step; no change to x̂0 means no change here.
    DDIM and Euler only (DPM-Solver++ mixes two steps' eps): the run's scheduler is checked at its first step.
    """

    def gain(state: StepState, name: str) -> Tensor:
        scheduler, position = run_scheduler(state)
        if SCHEDULERS[name].space == "ve":
            sigma, sigma_next = scheduler.sigmas[position], scheduler.sigmas[position + 1]
            return sigma / (sigma - sigma_next)
        a, a_next = scheduler.alphas_cumprod[int(state.timestep)], next_alpha_bar(state)
        k = a_next.sqrt() - ((1.0 - a_next) * a / (1.0 - a)).sqrt()
        return a_next.sqrt() / k

    def hook(state: StepState) -> Tensor:
        scheduler, position = run_scheduler(state)
        name = scheduler_name(scheduler)
        if name not in KEEPS_MODEL_EPS:
            raise ValueError(f"keeping the model's eps needs the ddim or euler scheduler, not {name}")
        x0_model = predicted_x0(name, scheduler, state.latents, state.eps, state.timestep, position)
        change = state.x0 - x0_model
        if not bool(change.abs().max() > 0):
            return state.x0
        return x0_model + gain(state, name).to(change) * change

    return last(hook)


KEEPS_MODEL_EPS = ("ddim", "euler")  # schedulers whose step is linear in one eps, so x̂0 can be rescaled
