"""SDTM / ToMe on SD3 (SD3.5 dual attention), DiT and SD U-Net pipelines: exactness, token counts, text stream, grids.

Expected token counts are written here from the method's formulas (cosine ratio, switch step on a 50-step grid,
protected steps, window counts), independently of `sdtm_plugin.schedule`, and observed with forward hooks on the
Linear layers that first see each sub-layer's tokens.
"""

import functools
import math

import pytest
import torch

from benchmarks.models import build_denoiser, denoiser_inputs, load_pipeline, PRESETS
from sdtm_plugin import SDTMConfig, apply_SDTM, apply_ToMe, get_merge_state, remove_SDTM, supported_models
from sdtm_plugin.config import DEFAULT_TOKEN_BUDGETS
from sdtm_plugin.schedule import removal_schedule

ARCHS = ("tiny-sd3", "tiny-dit", "tiny-sd")


@pytest.fixture(scope="module")
def pipes(tiny_pipe_dir):
    """One pipeline per preset, loaded once; every test leaves it unpatched."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_pipeline(name, cache_dir=tiny_pipe_dir)
            cache[name].set_progress_bar_config(disable=True)
        remove_SDTM(cache[name])
        return cache[name]

    yield get
    for pipe in cache.values():
        remove_SDTM(pipe)


def generate(name, pipe, steps=6, seed=0, batch=1, guidance=None, size=None):
    """Final latents (PixArt, SD3, SD) or decoded images (DiT, which has no latent output) of one generation."""
    kw = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    if guidance is not None:
        kw["guidance_scale"] = guidance
    if name == "tiny-dit":
        return pipe(class_labels=list(range(batch)), output_type="pt", **kw).images
    if size is not None:
        kw["height"], kw["width"] = size
    if name == "tiny":
        kw.update(use_resolution_binning=False, clean_caption=False)
    return pipe("a red cat", num_images_per_prompt=batch, output_type="latent", **kw).images


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def merged_modules(name, model):
    """(attn-like, mlp) Linear layers whose input is a block's merged tokens, in execution order, per block."""
    if name == "tiny-sd3":
        return [
            [("attn", b.attn.to_q)] + ([("attn2", b.attn2.to_q)] if b.attn2 is not None else []) + [("mlp", b.ff.net[0].proj)]
            for b in model.transformer_blocks
        ]
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    if name == "tiny-sd":  # execution order: down, mid, up
        order = [*model.down_blocks, model.mid_block, *model.up_blocks]
        blocks = [m for stage in order for m in stage.modules() if isinstance(m, BasicTransformerBlock)]
    return [[("attn", b.attn1.to_q), ("mlp", b.ff.net[0].proj)] for b in blocks]


class Recorder:
    """Per denoiser forward: {(block, name): tokens entering the Linear}; one dict per step."""

    def __init__(self, model, modules):
        self.steps = []
        self.handles = [model.register_forward_pre_hook(lambda m, a: self.steps.append({}))]
        for layer, subs in enumerate(modules):
            for label, linear in subs:
                self.handles.append(linear.register_forward_hook(self._hook((layer, label))))

    def _hook(self, key):
        def hook(module, args, output):
            self.steps[-1][key] = args[0].shape[-2]
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def sdtm_kept(step, steps, grid, sx=2, sy=2, ratio=0.3, deviation=0.2, switch_step=20, protect=3,
              budgets=DEFAULT_TOKEN_BUDGETS):
    """(attn, mlp) tokens of a block on `grid` with sx x sy windows, SDTM defaults: the phases and the paper's counts
    written from the formulas, a merged step's count from the budget schedule when `budgets` is set (its properties
    are tested in tests/test_schedule.py)."""
    n, windows, k = grid[0] * grid[1], windows_of(grid, sx, sy), sx * sy
    p = step / (steps - 1) if steps > 1 else 0.0
    r = (ratio - deviation) + 2 * deviation * math.cos(p * math.pi / 2)
    if (protect > 0 and step % protect == 0) or r <= 0:
        return n, n
    structure = step * 50 <= switch_step * steps
    removed = min(int(r * n / (k - 1)), windows) * (k - 1) if structure else min(int(r * n), n - windows)
    if budgets is not None:
        config = SDTMConfig(ratio=ratio, deviation=deviation, switch_step=switch_step, protect_steps_frequency=protect,
                            sx=sx, sy=sy, token_budgets=budgets)
        removed = removal_schedule(config, steps, grid)[step]
    return (n - removed, n - removed) if structure else (n, n - removed)


def tome_kept(n, windows, ratio=0.5):
    return n - min(int(ratio * n), n - windows)


def block_grids(name, latent_hw):
    """Token grid of each block: the patch grid for transformers; 16x16 and 8x8 levels for the tiny U-Net."""
    h, w = latent_hw
    if name == "tiny-sd":  # down (1 block at full res), mid (half res), up (2 blocks at full res)
        half = ((h + 1) // 2, (w + 1) // 2)
        return [(h, w), half, (h, w), (h, w)]
    layers = PRESETS[name].denoiser["num_layers"]
    return [(h // 2, w // 2)] * layers


def windows_of(grid, sx=2, sy=2):
    return (grid[0] // sy) * (grid[1] // sx)


def expected_sdtm(name, steps, latent_hw=(16, 16), max_downsample=1):
    grids = block_grids(name, latent_hw)
    full = grids[0][0] * grids[0][1]
    out = []
    for i in range(steps):
        row = {}
        for layer, grid in enumerate(grids):
            n = grid[0] * grid[1]
            allowed = full <= n * max_downsample**2
            attn, mlp = sdtm_kept(i, steps, grid) if allowed else (n, n)
            row[(layer, "attn")], row[(layer, "mlp")] = attn, mlp
            if name == "tiny-sd3" and layer == 0:  # SD3.5 dual attention: the same merged tokens
                row[(layer, "attn2")] = attn
        out.append(row)
    return out


@pytest.mark.parametrize("name", ARCHS)
def test_ratio_zero_and_removal_are_bit_identical(pipes, name):
    pipe = pipes(name)
    run = functools.partial(generate, steps=3)  # step 0 protected, steps 1-2 merged
    base = run(name, pipe)
    apply_SDTM(pipe, ratio=0.0, deviation=0.0)
    assert torch.equal(run(name, pipe), base)
    apply_ToMe(pipe, ratio=0.0)
    assert torch.equal(run(name, pipe), base)
    apply_SDTM(pipe)
    merged = run(name, pipe)
    assert torch.isfinite(merged).all() and not torch.equal(merged, base)
    remove_SDTM(pipe)
    assert torch.equal(run(name, pipe), base)
    for module in denoiser(pipe).modules():
        assert not hasattr(module, "_diffusers_hook") and "forward" not in module.__dict__


@pytest.mark.parametrize("name", ARCHS)
def test_sdtm_counts_follow_schedule_with_batches_and_guidance(pipes, name):
    pipe = pipes(name)
    model = denoiser(pipe)
    apply_SDTM(pipe)
    rec = Recorder(model, merged_modules(name, model))
    steps = 6  # structure 0-2, detail 3-5, protected 0 and 3
    generate(name, pipe, steps=steps, batch=2)  # CFG on: 2 images x 2 halves
    assert get_merge_state(pipe).batch_size == 4
    generate(name, pipe, steps=steps, guidance=1.0)  # CFG off
    assert get_merge_state(pipe).batch_size == 1
    rec.remove()
    expect = expected_sdtm(name, steps)
    assert rec.steps == expect + expect
    state_counts = [{(l, r): c[r][l] for l in range(len(c["attn"])) for r in ("attn", "mlp")} for c in get_merge_state(pipe).token_counts]
    assert state_counts == [{k: v for k, v in row.items() if k[1] != "attn2"} for row in expect]
    remove_SDTM(pipe)


@pytest.mark.parametrize("name", ARCHS)
def test_tome_counts_every_step(pipes, name):
    pipe = pipes(name)
    model = denoiser(pipe)
    apply_ToMe(pipe, ratio=0.5)
    rec = Recorder(model, merged_modules(name, model))
    generate(name, pipe, steps=3)
    rec.remove()
    grids = block_grids(name, (16, 16))
    for step in rec.steps:
        for (layer, label), tokens in step.items():
            n = grids[layer][0] * grids[layer][1]
            full_res = layer == 0 or n == grids[0][0] * grids[0][1]
            expect = tome_kept(n, windows_of(grids[layer])) if label != "mlp" and full_res else n
            assert tokens == expect, (layer, label)
    remove_SDTM(pipe)


def test_sd3_text_stream_untouched_and_dual_attention_merged(pipes):
    pipe = pipes("tiny-sd3")
    model = pipe.transformer
    assert model.transformer_blocks[0].attn2 is not None  # the tiny preset is SD3.5-style in block 0
    text = [[("text_attn", b.attn.add_q_proj)] + ([("text_mlp", b.ff_context.net[0].proj)] if b.ff_context is not None else [])
            for b in model.transformer_blocks]
    rec = Recorder(model, text)
    generate("tiny-sd3", pipe, steps=4)
    unpatched = rec.steps[:]
    rec.steps.clear()
    apply_SDTM(pipe, protect_steps_frequency=-1, switch_step=50)  # every step merges attention and MLP
    image = Recorder(model, merged_modules("tiny-sd3", model))
    generate("tiny-sd3", pipe, steps=4)
    rec.remove()
    image.remove()
    assert rec.steps == unpatched and all(v == 77 + 256 for s in unpatched for v in s.values())
    for step in image.steps:
        assert all(tokens < 64 for tokens in step.values())  # image stream merged everywhere, attn2 included
        assert step[(0, "attn2")] == step[(0, "attn")]
    remove_SDTM(pipe)


@pytest.mark.parametrize("max_downsample", [1, 2])
def test_unet_grids_per_resolution_and_max_downsample(pipes, max_downsample):
    pipe = pipes("tiny-sd")
    apply_SDTM(pipe, max_downsample=max_downsample)
    rec = Recorder(pipe.unet, merged_modules("tiny-sd", pipe.unet))
    generate("tiny-sd", pipe, steps=5)
    rec.remove()
    state = get_merge_state(pipe)
    assert state.grid == (16, 16) and state.layer_grids == [(16, 16), (8, 8), (16, 16), (16, 16)]
    assert rec.steps == expected_sdtm("tiny-sd", 5, max_downsample=max_downsample)
    mid = [step[(1, "attn")] for step in rec.steps]
    assert (min(mid) < 64) == (max_downsample >= 2)  # the 8x8 mid block merges only when allowed
    remove_SDTM(pipe)


def test_unet_odd_latents_bare_model():
    """18x14 latents: the U-Net's lower level is 9x7, whose windows leave a loose row and column."""
    torch.manual_seed(0)
    model = build_denoiser(PRESETS["tiny-sd"])
    inputs = denoiser_inputs(PRESETS["tiny-sd"], batch_size=2)
    inputs["sample"] = torch.randn(2, 4, 18, 14)
    base = model(**inputs).sample
    apply_SDTM(model, num_inference_steps=4, max_downsample=2, protect_steps_frequency=-1)
    rec = Recorder(model, merged_modules("tiny-sd", model))
    outs = [model(**inputs).sample for _ in range(4)]
    rec.remove()
    assert get_merge_state(model).layer_grids == [(18, 14), (9, 7), (18, 14), (18, 14)]
    assert len(rec.steps) == 4 and all(len(row) == 8 for row in rec.steps)
    grids = [(18, 14), (9, 7), (18, 14), (18, 14)]
    for i, row in enumerate(rec.steps):
        for (layer, label), tokens in row.items():
            assert tokens == sdtm_kept(i, 4, grids[layer], protect=-1)[label == "mlp"], (i, layer, label)
    assert all(o.shape == base.shape and torch.isfinite(o).all() for o in outs)
    remove_SDTM(model)
    assert torch.equal(model(**inputs).sample, base)


def test_unsupported_model_lists_supported_ones(pipes):
    from diffusers import UNet2DModel

    for model in (torch.nn.Linear(4, 4), UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                                     down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)):
        with pytest.raises(TypeError, match="supported models") as err:
            apply_SDTM(model)
        for family in ("PixArt", "Stable Diffusion 3", "DiT", "U-Net"):
            assert family in str(err.value)
        assert not hasattr(model, "_diffusers_hook")
    with pytest.raises(TypeError, match="supported models"):
        apply_ToMe(object())
    assert "SD3Transformer2DModel" in supported_models()
