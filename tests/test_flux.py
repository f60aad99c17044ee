"""FLUX.1 (issue 27): merging through diffusers' own FluxPipeline, the joint sequence's text rows never merged, one
plan shared by the batch, and the rotary table of merged rows built by the configured position rule."""

import math

import pytest
import torch
from conftest import quiet_pipeline
from diffusers.hooks import FirstBlockCacheConfig

from benchmarks.models import PRESETS, flux_inputs
from sdtm_plugin import SDTMConfig, apply_SDTM, apply_ToMe, get_merge_state, remove_SDTM
from sdtm_plugin.merge import WindowGrid, bipartite_merge, window_merge
from sdtm_plugin.rotary import merge_rotary

TEXT = 16  # the tiny preset's T5 tokens
IMAGE = 64  # its 8 x 8 packed tokens


@pytest.fixture()
def flux_pipe(tiny_pipe_dir):
    return quiet_pipeline("tiny-flux", tiny_pipe_dir)


def generate(pipe, prompt="a red cat on a boat", steps=8, **kwargs):
    return pipe(prompt, height=32, width=32, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                max_sequence_length=TEXT, output_type="latent", **kwargs).images


def _hooks(model) -> dict[str, list[str]]:
    """Hook names per module (FluxPipeline's cache contexts give the bare transformer an empty registry)."""
    return {name: list(m._diffusers_hook.hooks) for name, m in model.named_modules() if hasattr(m, "_diffusers_hook")}


def test_ratio_zero_is_bit_identical_and_removal_is_exact(flux_pipe):
    base = generate(flux_pipe)
    bare = _hooks(flux_pipe.transformer)
    apply_SDTM(flux_pipe, ratio=0.0)
    assert torch.equal(generate(flux_pipe), base)
    apply_SDTM(flux_pipe)
    merged = generate(flux_pipe)
    assert not torch.equal(merged, base)
    remove_SDTM(flux_pipe)
    assert torch.equal(generate(flux_pipe), base)
    assert _hooks(flux_pipe.transformer) == bare == {"": []}
    assert not any("forward" in m.__dict__ for m in flux_pipe.transformer.modules())


class RowRecorder:
    """Rows of chosen linear layers, per transformer call, seen by PyTorch hooks from outside the plugin (they wrap
    the module's whole forward, diffusers hooks included): the input rows, or for `proj_mlp`, whose own hook merges
    its input, the output rows."""

    def __init__(self, transformer):
        self.calls: list[dict[str, list[int]]] = []
        transformer.register_forward_pre_hook(lambda *_: self.calls.append({}))
        double, single = transformer.transformer_blocks, transformer.single_transformer_blocks
        watched = {"image q": [b.attn.to_q for b in double], "text q": [b.attn.add_q_proj for b in double],
                   "image mlp": [b.ff.net[0].proj for b in double], "single q": [b.attn.to_q for b in single],
                   "single out": [b.proj_out for b in single]}
        for name, modules in watched.items():
            for module in modules:
                module.register_forward_pre_hook(lambda _, args, name=name: self.record(name, args[0]))
        for block in single:
            block.proj_mlp.register_forward_hook(lambda _, args, out: self.record("single mlp", out))

    def record(self, name, x):
        self.calls[-1].setdefault(name, []).append(x.shape[1])


@pytest.mark.parametrize("method", ["sdtm", "tome"])
def test_token_counts_seen_at_the_projections_and_text_never_merged(flux_pipe, method):
    """Seen by hooks on the projections: the image stream's rows are the state's merged counts; the text stream keeps
    its T rows; a single-stream block runs its MLP, attention and output projection on T + N' rows."""
    recorder = RowRecorder(flux_pipe.transformer)
    (apply_SDTM if method == "sdtm" else apply_ToMe)(flux_pipe)
    generate(flux_pipe)
    counts = get_merge_state(flux_pipe).token_counts
    assert len(recorder.calls) == len(counts) == 8  # guidance-distilled: one call per step
    merged_steps = 0
    for seen, step in zip(recorder.calls, counts):
        attn, mlp = step["attn"], step["mlp"]
        assert seen["text q"] == [TEXT, TEXT]
        assert seen["image q"] == attn[:2] and seen["image mlp"] == mlp[:2]
        assert seen["single mlp"] == [TEXT + n for n in mlp[2:]]
        assert seen["single q"] == [TEXT + n for n in attn[2:]]
        both = [TEXT + a if a == m else TEXT + IMAGE for a, m in zip(attn[2:], mlp[2:])]
        assert seen["single out"] == both  # proj_out on the merged rows only when both branches merge
        merged_steps += min(attn + mlp) < IMAGE
    assert merged_steps >= 2


def test_one_plan_for_the_batch(flux_pipe):
    """Rotary models share one merge plan over the batch: two copies of one image in a batch stay identical, and a
    batch of different prompts merges (and runs) with one token count per block."""
    apply_SDTM(flux_pipe)
    noise = torch.randn(1, IMAGE, 64, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1)
    twins = generate(flux_pipe, prompt=["a red cat"] * 2, latents=noise)
    assert torch.equal(twins[0], twins[1])
    mixed = generate(flux_pipe, prompt=["a red cat", "a blue boat"])
    assert mixed.shape[0] == 2 and not torch.equal(mixed[0], mixed[1])
    assert min(n for step in get_merge_state(flux_pipe).token_counts for n in step["attn"]) < IMAGE


@pytest.mark.parametrize("rule", ["destination", "mean"])
def test_position_rules_give_different_images(flux_pipe, rule):
    base = generate(flux_pipe)
    apply_SDTM(flux_pipe, rotary_positions=rule)
    out = generate(flux_pipe)
    other = "mean" if rule == "destination" else "destination"
    apply_SDTM(flux_pipe, rotary_positions=other)
    assert not torch.equal(out, base) and not torch.equal(out, generate(flux_pipe))


def _table(text: int, grid: tuple[int, int], dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A FLUX-layout (T + N, dim) rotary table: text rows at position 0, image rows at their (row, col) angles."""
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w).float()
    cols = torch.arange(w).repeat(h).float()
    freqs = torch.tensor([1.0, 0.3])
    angles = torch.cat([torch.zeros(text, dim // 2), torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], 1)])
    angles = angles.repeat_interleave(2, dim=1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("kind", ["window", "bipartite"])
def test_rotary_rules_on_a_merge(kind):
    torch.manual_seed(0)
    grid = WindowGrid.build((6, 6), 2, 2, torch.device("cpu"))
    x = torch.randn(1, 36, 16)
    merge = window_merge(x, grid, 3) if kind == "window" else bipartite_merge(x, grid, 12)
    cos, sin = _table(5, (6, 6))
    picked = merge_rotary((cos, sin), merge, 0, "destination")
    assert picked[0].shape == (5 + merge.num_rows, 8)
    assert torch.equal(picked[0][:5], cos[:5]) and torch.equal(picked[1][:5], sin[:5])  # text rows untouched
    # each merged row takes the angles of one token of its group (its first: the destination); kept rows their own
    rows = merge.row_of_token[0]
    for row in range(merge.num_rows):
        members = (rows == row).nonzero().flatten()
        first = members[0] if kind == "window" else members[(picked[0][5 + row] == cos[5 + members]).all(1)][0]
        assert torch.equal(picked[0][5 + row], cos[5 + first]) and torch.equal(picked[1][5 + row], sin[5 + first])
    mean_cos, mean_sin = merge_rotary((cos, sin), merge, 0, "mean")
    torch.testing.assert_close(mean_cos.square() + mean_sin.square(), torch.ones_like(mean_cos))  # rotations
    angle = torch.atan2(mean_sin[5:], mean_cos[5:])
    for row in range(merge.num_rows):  # the circular mean of the group's angles
        members = (rows == row).nonzero().flatten()
        expected = torch.atan2(sin[5 + members].mean(0), cos[5 + members].mean(0))
        torch.testing.assert_close(angle[row], expected, atol=1e-5, rtol=0)
        if len(members) == 1:
            torch.testing.assert_close(mean_cos[5 + row], cos[5 + members[0]])


def test_wan_layout_rotary_table_is_merged_along_its_sequence_axis():
    """A (1, S, 1, D) table (Wan's layout, sequence on axis 1) merges like the (S, D) one."""
    grid = WindowGrid.build((4, 4), 2, 2, torch.device("cpu"))
    merge = window_merge(torch.randn(1, 16, 8), grid, 2)
    cos, sin = _table(0, (4, 4))
    flat = merge_rotary((cos, sin), merge, 0, "mean")
    wan = merge_rotary((cos[None, :, None], sin[None, :, None]), merge, 1, "mean")
    assert wan[0].shape == (1, merge.num_rows, 1, 8)
    torch.testing.assert_close(wan[0][0, :, 0], flat[0])


def test_expanded_merge_applies_one_plan_to_every_image():
    grid = WindowGrid.build((4, 4), 2, 2, torch.device("cpu"))
    plan = bipartite_merge(torch.randn(1, 16, 8), grid, 5)
    expanded = plan.expand(3)
    x = torch.randn(3, 16, 8)
    merged = expanded.merge(x)
    for i in range(3):
        torch.testing.assert_close(merged[i: i + 1], plan.merge(x[i: i + 1]))
        torch.testing.assert_close(expanded.unmerge(merged)[i: i + 1], plan.unmerge(merged[i: i + 1]))
    assert expanded.plan is plan and torch.equal(expanded.merged_flags()[2], plan.merged_flags()[0])
    with pytest.raises(ValueError, match="one image"):
        expanded.expand(2)


def test_composes_with_a_step_cache_in_one_call_and_is_removed_exactly(flux_pipe):
    base = generate(flux_pipe)
    apply_SDTM(flux_pipe, step_cache=FirstBlockCacheConfig(threshold=0.2))
    out = generate(flux_pipe)
    assert out.shape == base.shape and torch.isfinite(out).all() and not torch.equal(out, base)
    remove_SDTM(flux_pipe)
    assert torch.equal(generate(flux_pipe), base)


def test_image_ids_off_one_grid_are_refused():
    """FLUX Kontext appends a reference image's tokens (ids [1, row, col]): not one grid, so merging refuses."""
    from diffusers import FluxTransformer2DModel

    preset = PRESETS["tiny-flux"]
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**preset.denoiser).eval()
    inputs = flux_inputs(preset)
    reference = inputs["img_ids"].clone()
    reference[:, 0] = 1
    inputs["img_ids"] = torch.cat([inputs["img_ids"], reference])
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"]] * 2, dim=1)
    apply_SDTM(model, num_inference_steps=4)
    with pytest.raises(ValueError, match="img_ids"):
        model(**inputs)


def test_bad_position_rule_is_refused():
    with pytest.raises(ValueError, match="rotary_positions"):
        SDTMConfig(rotary_positions="nearest")


def test_full_size_presets_match_the_published_geometry():
    dev = PRESETS["flux-dev"]
    assert dev.num_tokens == 4096 and dev.resolution == 1024 and dev.denoiser["guidance_embeds"]
    assert not PRESETS["flux-schnell"].denoiser["guidance_embeds"]
    assert tuple(dev.denoiser["axes_dims_rope"]) == (16, 56, 56)  # text/index axis, rows, columns: head_dim 128
