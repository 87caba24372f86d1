"""LoRA Apply (methods.md §6 G4): LoRAs stack on a VE_MODEL without changing it, a scope activates
exactly a model's LoRAs, and leaving it gives the base model back bit for bit.

The reference for "correct" is the LoRA equation applied by hand to a copy of the weights:
W' = W + s · (α / r) · up · down, per layer, with ranks and alphas that differ between layers.
"""

import copy
import hashlib
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from comfyui_video_edit.pipelines_core.models.lora import (
    LoraSpec, add_lora, adapter_name_for, check_lora, lora_scope,
)
from comfyui_video_edit.pipelines_core.models.model import encode_prompt, load_model
from comfyui_video_edit.pipelines_core.sampling.sampler import edit_video
from comfyui_video_edit.pipelines_core.sampling.settings import SamplerSettings

UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "ff.net.2")
TE_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")
PROMPT = "a red fox in the snow"


# --- tiny LoRA files, built from a table {module path: (down, up, alpha)} ----------------------------

def lora_table(module, targets, seed, in_features=None):
    """Seeded non-zero factors for every Linear whose path ends with a target; ranks 2/4 and
    alphas 1/2/4 vary by layer so a per-layer α/r mistake shows. `in_features` forces a wrong size."""
    g = torch.Generator().manual_seed(seed)
    table = {}
    for i, (path, layer) in enumerate(module.named_modules()):
        layer = getattr(layer, "base_layer", layer)  # the module may already hold LoRA adapters
        if isinstance(layer, torch.nn.Linear) and path.endswith(targets):
            rank, alpha = (4, 2) if i % 2 else (2, 1 + i % 3)
            down = torch.randn(rank, in_features or layer.in_features, generator=g) * 0.3
            up = torch.randn(layer.out_features, rank, generator=g) * 0.3
            table[path] = (down, up, float(alpha))
    assert table
    return table


def te_path(path):
    return path if path.startswith("text_model.") else "text_model." + path  # kohya names the CLIP root


def kohya_state(unet_table, te_table=None):
    state = {}
    for prefix, table, rename in (("lora_unet_", unet_table, str), ("lora_te_", te_table or {}, te_path)):
        for path, (down, up, alpha) in table.items():
            name = prefix + rename(path).replace(".", "_")
            state[f"{name}.lora_down.weight"] = down
            state[f"{name}.lora_up.weight"] = up
            state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def diffusers_state(unet_table, te_table=None, names=("lora_A", "lora_B")):
    """The same numbers in the diffusers/peft layout: no alphas in the file, so α/r goes into `up`."""
    state = {}
    for part, table in (("unet", unet_table), ("text_encoder", te_table or {})):
        for path, (down, up, alpha) in table.items():
            state[f"{part}.{path}.{names[0]}.weight"] = down
            state[f"{part}.{path}.{names[1]}.weight"] = up * (alpha / down.shape[0])
    return state


def write(folder, name, state):
    path = os.path.join(folder, name)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def merged(model, tables_and_strengths):
    """Reference: a deep copy whose weights have the LoRA updates added by hand."""
    ref = copy.deepcopy(model)
    for module, table, strength in tables_and_strengths:
        target = ref.unet if module is model.unet else ref.text_encoder
        for path, (down, up, alpha) in table.items():
            target.get_submodule(path).weight.data += strength * (alpha / down.shape[0]) * up @ down
    return ref


# --- what the model computes -----------------------------------------------------------------------

LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
CONTEXT = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(8))


@torch.no_grad()
def unet_out(model):
    return model.unet(LATENTS, 500, encoder_hidden_states=CONTEXT).sample


def prompt_out(model):
    return encode_prompt(model, PROMPT)


@pytest.fixture(scope="module")
def base():
    """A tiny model of this module's own (LoRAs get loaded into its modules), with its outputs
    recorded before any LoRA touched it."""
    model = load_model("builtin:tiny", dtype="fp32", device="cpu")
    return SimpleNamespace(model=model, unet=unet_out(model), prompt=prompt_out(model))


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("loras"))
    m = base.model
    unet, te = lora_table(m.unet, UNET_TARGETS, seed=1), lora_table(m.text_encoder, TE_TARGETS, seed=2)
    other = lora_table(m.unet, UNET_TARGETS, seed=3)
    return SimpleNamespace(
        unet=unet, te=te, other=other,
        kohya=write(folder, "style_kohya.safetensors", kohya_state(unet, te)),
        peft=write(folder, "style_peft.safetensors", diffusers_state(unet, te)),
        old_diffusers=write(folder, "style_old.safetensors", diffusers_state(unet, te, ("lora.down", "lora.up"))),
        other_path=write(folder, "other.safetensors", kohya_state(other)),
        folder=folder,
    )


def assert_close(a, b, tol=1e-5):
    assert (a - b).abs().max().item() <= tol


# --- G4: effect, strength 0, exit ----------------------------------------------------------------------

@pytest.mark.parametrize("strength", [1.0, 0.7, -0.5])
def test_lora_applies_W_plus_strength_alpha_over_r_up_down(base, files, strength):
    model = add_lora(base.model, files.kohya, strength)
    ref = merged(base.model, [(base.model.unet, files.unet, strength), (base.model.text_encoder, files.te, strength)])
    with lora_scope(model):
        unet, prompt = unet_out(model), prompt_out(model)
    assert (unet - base.unet).abs().max() > 1e-2  # the LoRA changes the UNet output ...
    assert_close(unet, unet_out(ref))  # ... exactly as the equation says
    assert (prompt - base.prompt).abs().max() > 1e-2  # the text-encoder part changes encode_prompt
    assert_close(prompt, prompt_out(ref))


def test_strength_zero_is_exactly_the_base(base, files):
    model = add_lora(base.model, files.kohya, 0.0)
    with lora_scope(model):
        assert torch.equal(unet_out(model), base.unet)
        assert torch.equal(prompt_out(model), base.prompt)


def test_scope_exit_gives_back_the_bit_identical_base_and_upstream_is_untouched(base, files):
    model = add_lora(base.model, files.kohya, 1.0)
    assert base.model.loras == () and len(model.loras) == 1  # a new VEModel; the input is not changed
    assert model.unet is base.model.unet  # weights are shared, not copied
    with lora_scope(model):
        assert not torch.equal(unet_out(model), base.unet)
    assert torch.equal(unet_out(base.model), base.unet)
    assert torch.equal(prompt_out(base.model), base.prompt)
    assert not any(p.requires_grad for p in base.model.unet.parameters())  # adapters load frozen


def test_no_loras_scope_changes_nothing(base):
    with lora_scope(base.model):
        assert torch.equal(unet_out(base.model), base.unet)


def test_two_branches_give_their_own_results_in_either_order_repeatedly(base, files):
    a = base.model
    b = add_lora(a, files.kohya, 0.8)
    results = {"a": [], "b": []}

    def run(which):
        model = a if which == "a" else b
        with lora_scope(model):
            results[which].append(unet_out(model))

    for which in ("b", "a", "b", "b", "a", "a", "b"):
        run(which)
    assert all(torch.equal(r, base.unet) for r in results["a"])
    assert all(torch.equal(r, results["b"][0]) for r in results["b"])
    assert not torch.equal(results["b"][0], base.unet)


def test_a_base_scope_inside_a_lora_scope_computes_the_base_and_restores_the_outer(base, files):
    b = add_lora(base.model, files.kohya, 1.0)
    with lora_scope(b):
        outer = unet_out(b)
        with lora_scope(base.model):
            assert torch.equal(unet_out(base.model), base.unet)
        assert torch.equal(unet_out(b), outer)
    assert torch.equal(unet_out(base.model), base.unet)


# --- layouts and stacking -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["peft", "old_diffusers"])
def test_kohya_and_diffusers_layouts_of_the_same_numbers_agree(base, files, layout):
    kohya, other = add_lora(base.model, files.kohya, 1.0), add_lora(base.model, getattr(files, layout), 1.0)
    assert kohya.loras[0].adapter_name != other.loras[0].adapter_name  # two files, two adapters
    with lora_scope(kohya):
        expected = unet_out(kohya), prompt_out(kohya)
    with lora_scope(other):
        assert_close(unet_out(other), expected[0], 1e-6)
        assert_close(prompt_out(other), expected[1], 1e-6)


def test_diffusers_header_alpha_is_honoured(base, files, tmp_path):
    """A file written by diffusers' save_lora_weights carries its LoraConfig (r=4, lora_alpha=8):
    it must scale like the kohya file with alpha 8."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    g = torch.Generator().manual_seed(5)
    table = {path: (torch.randn(4, down.shape[1], generator=g) * 0.1, torch.randn(up.shape[0], 4, generator=g) * 0.1,
                    8.0) for path, (down, up, _) in files.unet.items()}
    peft_keys = {}
    for path, (down, up, _) in table.items():
        peft_keys[f"{path}.lora_A.weight"], peft_keys[f"{path}.lora_B.weight"] = down, up
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(tmp_path), unet_lora_layers=peft_keys, weight_name="saved.safetensors",
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8, "target_modules": sorted(table)},
    )
    saved = add_lora(base.model, str(tmp_path / "saved.safetensors"), 1.0)
    kohya = add_lora(base.model, write(str(tmp_path), "same_kohya.safetensors", kohya_state(table)), 1.0)
    with lora_scope(kohya):
        expected = unet_out(kohya)
    assert_close(expected, unet_out(merged(base.model, [(base.model.unet, table, 1.0)])))
    with lora_scope(saved):
        assert_close(unet_out(saved), expected, 1e-6)


def test_same_file_twice_at_half_strength_equals_once_at_full(base, files):
    halves = add_lora(add_lora(base.model, files.kohya, 0.5), files.kohya, 0.5)
    whole = add_lora(base.model, files.kohya, 1.0)
    with lora_scope(whole):
        expected = unet_out(whole)
    with lora_scope(halves):
        assert_close(unet_out(halves), expected)


def test_two_different_loras_stack_by_adding_their_updates(base, files):
    model = add_lora(add_lora(base.model, files.kohya, 0.6), files.other_path, 0.9)
    ref = merged(base.model, [(base.model.unet, files.unet, 0.6), (base.model.text_encoder, files.te, 0.6),
                              (base.model.unet, files.other, 0.9)])
    with lora_scope(model):
        assert_close(unet_out(model), unet_out(ref))
        assert_close(prompt_out(model), prompt_out(ref))


def test_a_file_is_loaded_once_under_a_name_tied_to_its_content(base, files):
    specs = [add_lora(base.model, files.kohya, s).loras[0] for s in (0.3, 1.0)]
    assert specs[0].adapter_name == specs[1].adapter_name
    with lora_scope(base.model.with_changes(loras=tuple(specs))):
        assert set(base.model.unet.peft_config) == {specs[0].adapter_name}  # stacked twice, loaded once
    stat = os.stat(files.other_path)
    before = adapter_name_for(files.other_path)
    os.utime(files.other_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "edited" file
    assert adapter_name_for(files.other_path) != before


def tensors_digest(module):
    return {name: (tuple(t.shape), t.dtype, hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
            for name, t in module.state_dict().items()}


def test_a_scope_hands_the_shared_modules_back_exactly_as_it_found_them(base, files):
    """A Load Model output is shared by every later graph (ComfyUI caches it): after a LoRA graph the
    modules must be the plain ones again, or a ControlNet built from the UNet copies peft's keys."""
    from diffusers import ControlNetModel

    before = {part: tensors_digest(getattr(base.model, part)) for part in ("unet", "text_encoder")}
    with lora_scope(add_lora(add_lora(base.model, files.kohya, 0.7), files.other_path, 0.4)):
        assert any("lora_A" in k for k in base.model.unet.state_dict())
    for part in ("unet", "text_encoder"):
        module = getattr(base.model, part)
        assert tensors_digest(module) == before[part]
        assert not hasattr(module, "peft_config") and not getattr(module, "_hf_peft_config_loaded", False)
    ControlNetModel.from_unet(base.model.unet)  # failed with "Error(s) in loading state_dict ... base_layer"


# --- errors, before anything changes -----------------------------------------------------------------------

def one_line_error(exc_type, call, *words):
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_shape_mismatched_lora_is_refused_before_sampling_and_changes_nothing(base, tmp_path):
    wrong = lora_table(base.model.unet, ("attn2.to_k",), seed=4, in_features=48)  # made for another context size
    path = write(str(tmp_path), "other_base.safetensors", kohya_state(wrong))
    loaded = set(getattr(base.model.unet, "peft_config", {}))
    one_line_error(ValueError, lambda: check_lora(base.model, path), "does not fit this model", "attn2.to_k")
    one_line_error(ValueError, lambda: add_lora(base.model, path, 1.0), "does not fit this model")
    assert set(getattr(base.model.unet, "peft_config", {})) == loaded
    assert torch.equal(unet_out(base.model), base.unet)


def test_a_scope_checks_its_files_before_changing_the_modules(base, files, tmp_path):
    """A spec made without add_lora's check (or a file replaced since) fails on entry, leaving the base."""
    wrong = lora_table(base.model.unet, ("attn2.to_k",), seed=4, in_features=48)
    path = write(str(tmp_path), "replaced.safetensors", {**kohya_state(files.unet), **kohya_state(wrong)})
    spec = LoraSpec(path, 1.0, adapter_name_for(path), ("unet",))
    loaded = set(getattr(base.model.unet, "peft_config", {}))

    def enter():
        with lora_scope(base.model.with_changes(loras=(spec,))):
            pytest.fail("the scope must not run its block")

    one_line_error(ValueError, enter, "does not fit this model")
    assert set(getattr(base.model.unet, "peft_config", {})) == loaded
    assert torch.equal(unet_out(base.model), base.unet)


def test_files_that_are_not_sd15_loras_give_clear_errors(base, files, tmp_path):
    m, folder = base.model, str(tmp_path)
    one_line_error(FileNotFoundError, lambda: add_lora(m, os.path.join(folder, "nope.safetensors")), "not found")
    checkpoint = write(folder, "checkpoint.safetensors", dict(list(m.unet.state_dict().items())[:4]))
    one_line_error(ValueError, lambda: check_lora(m, checkpoint), "not a LoRA for SD-1.5")
    sdxl_te2 = kohya_state({}, files.te)
    sdxl_te2 = {k.replace("lora_te_", "lora_te2_"): v for k, v in sdxl_te2.items()}
    one_line_error(ValueError, lambda: check_lora(m, write(folder, "xl.safetensors", sdxl_te2)),
                   "not a LoRA for SD-1.5", "text_encoder_2")
    loha = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.ones(2, 2)}
    one_line_error(ValueError, lambda: check_lora(m, write(folder, "loha.safetensors", loha)), "not a LoRA for SD-1.5")
    mixed = {**kohya_state(files.unet), "unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3)}
    one_line_error(ValueError, lambda: check_lora(m, write(folder, "mixed.safetensors", mixed)), "mixes kohya")
    sgm_names = {k.replace("down_blocks_0_attentions_0", "input_blocks_1_1"): v for k, v in
                 kohya_state(files.unet).items() if "down_blocks_0_attentions_0" in k}
    one_line_error(ValueError, lambda: check_lora(m, write(folder, "sgm.safetensors", sgm_names)),
                   "does not fit this model")
    assert check_lora(m, files.kohya) == {"unet": len(files.unet), "text_encoder": len(files.te)}


# --- with the sampler, and unloading --------------------------------------------------------------------------

def test_edit_video_inside_the_scope_uses_the_lora_and_the_base_branch_does_not(base, files, clip_frames):
    settings = SamplerSettings(PROMPT, seed=2, steps=2, strength=0.5, attention="first+previous")
    a, b = base.model, add_lora(base.model, files.kohya, 1.0)
    first = edit_video(a, settings, clip_frames)
    with lora_scope(b):
        styled = edit_video(b, settings, clip_frames)
    with lora_scope(a):
        again = edit_video(a, settings, clip_frames)
    assert not torch.allclose(styled, first, atol=1e-3)
    assert torch.equal(again, first)


def test_leaving_the_scope_gives_back_plain_modules_and_a_later_scope_reloads(files):
    model = load_model("builtin:tiny", dtype="fp32", device="cpu")
    pristine = unet_out(model)
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    original = model.unet.get_submodule(to_q)
    styled_model = add_lora(model, files.kohya, 1.0)
    with lora_scope(styled_model):
        styled = unet_out(styled_model)
    assert model.unet.get_submodule(to_q) is original
    assert not any("lora" in name for name, _ in model.unet.named_modules())
    assert torch.equal(unet_out(model), pristine)
    with lora_scope(styled_model):
        assert torch.equal(unet_out(styled_model), styled)
