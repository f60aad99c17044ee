"""FLUX.1 (issue 27): merging through diffusers' own FluxPipeline, the joint sequence's text rows never merged, plans
per image (an image never depends on its batch mates), and merged rows rotated by the configured position rule."""

import math

import pytest
import torch
from conftest import quiet_pipeline
from diffusers.hooks import FirstBlockCacheConfig

from benchmarks.models import PRESETS, flux_inputs
from sdtm_plugin import SDTMConfig, apply_SDTM, apply_ToMe, get_merge_state, remove_SDTM
from sdtm_plugin.grid import WindowGrid
from sdtm_plugin.merge import bipartite_merge, window_merge
from sdtm_plugin.rotary import RotaryArg, RowRotary

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


@pytest.mark.parametrize("apply", [apply_SDTM, apply_ToMe])
def test_an_image_never_depends_on_its_batch_mates(flux_pipe, apply):
    """Plans per image, each merged row rotated by its own image's positions: with the same prompt, seed and noise,
    image 0 is the same whatever prompt image 1 has (one plan from the batch's mean changed it by half the merge's
    own effect on the trained model). ToMe's one draw serves every image, so an image batched is the image alone;
    SDTM draws its random ties per image from one generator, so its draws (not its plans) follow the batch size."""
    apply(flux_pipe)
    noise = torch.randn(2, IMAGE, 64, generator=torch.Generator().manual_seed(1))
    one = generate(flux_pipe, prompt=["a red cat", "a blue boat"], latents=noise)
    other = generate(flux_pipe, prompt=["a red cat", "a green tree"], latents=noise)
    torch.testing.assert_close(one[0], other[0], rtol=0, atol=1e-5)  # float batching noise only
    assert not torch.equal(one[1], other[1])
    assert min(n for step in get_merge_state(flux_pipe).token_counts for n in step["attn"]) < IMAGE
    if apply is apply_ToMe:
        alone = generate(flux_pipe, prompt=["a red cat"], latents=noise[:1])
        torch.testing.assert_close(one[:1], alone, rtol=0, atol=1e-5)


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


def _merged_table(table, merge, rule, seq_dim=0):
    """(cos, sin) of the merged image rows, (B, N', D), as the patch rotates them."""
    return RowRotary(table, RotaryArg("rotary", None, seq_dim), merge, "both", rule).tables("query", "image")


@pytest.mark.parametrize("kind", ["window", "bipartite"])
def test_rotary_rules_on_a_merge(kind):
    torch.manual_seed(0)
    grid = WindowGrid.build((6, 6), 2, 2, torch.device("cpu"))
    x = torch.randn(2, 36, 16)
    merge = window_merge(x, grid, 3) if kind == "window" else bipartite_merge(x, grid, 12)
    cos, sin = _table(5, (6, 6))
    rotary = RowRotary((cos, sin), RotaryArg("rotary", None, 0), merge, "both", "destination")
    text = rotary.tables("key", "text")
    assert torch.equal(text[0][0], cos[:5]) and torch.equal(text[1][0], sin[:5])  # text rows untouched
    joint = rotary.tables("query", "joint")
    assert joint[0].shape == (2, 5 + merge.num_rows, 8) and torch.equal(joint[0][:, :5], cos[:5].expand(2, -1, -1))
    picked = rotary.tables("key", "image")
    for image in range(2):  # each image's merged rows take the angles of one token of their group (the first)
        rows = merge.row_of_token[image]
        for row in range(merge.num_rows):
            members = (rows == row).nonzero().flatten()
            first = members[0] if kind == "window" else members[(picked[0][image, row] == cos[5 + members]).all(1)][0]
            assert torch.equal(picked[0][image, row], cos[5 + first]) and torch.equal(picked[1][image, row], sin[5 + first])
    mean_cos, mean_sin = _merged_table((cos, sin), merge, "mean")
    torch.testing.assert_close(mean_cos.square() + mean_sin.square(), torch.ones_like(mean_cos))  # rotations
    angle = torch.atan2(mean_sin, mean_cos)
    for image in range(2):  # the circular mean of the group's angles
        rows = merge.row_of_token[image]
        for row in range(merge.num_rows):
            members = (rows == row).nonzero().flatten()
            expected = torch.atan2(sin[5 + members].mean(0), cos[5 + members].mean(0))
            torch.testing.assert_close(angle[image, row], expected, atol=1e-5, rtol=0)


def test_wan_layout_rotary_table_is_merged_along_its_sequence_axis():
    """A (1, S, 1, D) table (Wan's layout, sequence on axis 1) merges like the (S, D) one."""
    grid = WindowGrid.build((4, 4), 2, 2, torch.device("cpu"))
    merge = window_merge(torch.randn(1, 16, 8), grid, 2)
    cos, sin = _table(0, (4, 4))
    flat = _merged_table((cos, sin), merge, "mean")
    wan = _merged_table((cos[None, :, None], sin[None, :, None]), merge, "mean", seq_dim=1)
    torch.testing.assert_close(wan[0], flat[0])


def test_a_bad_side_or_rule_is_refused():
    merge = window_merge(torch.randn(1, 16, 8), WindowGrid.build((4, 4), 2, 2, torch.device("cpu")), 2)
    with pytest.raises(ValueError, match="side"):
        RowRotary(_table(0, (4, 4)), RotaryArg("rotary", None, 0), merge, "both", None)


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
