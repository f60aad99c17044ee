"""Real-world compatibility: fp16/bf16, torch.compile, model CPU offload, odd / non-square grids, resolution changes."""

import pytest
import torch
from conftest import generate as generate_pixart
from test_architectures import Recorder, merged_modules, sdtm_kept, tome_kept, windows_of

from benchmarks.models import PRESETS, build_denoiser, denoiser_inputs
from sdtm_plugin import apply_SDTM, apply_ToMe, get_merge_state, remove_SDTM
from sdtm_plugin.grid import WindowGrid
from sdtm_plugin.merge import bipartite_merge, window_merge

FAMILIES = ("tiny", "tiny-sd3", "tiny-dit", "tiny-sd", "tiny-flux", "tiny-wan")


def forward(model, inputs):
    return model(**inputs).sample


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", FAMILIES)
def test_low_precision_is_finite_and_follows_the_fp32_schedule(name, dtype):
    """Bare denoisers in fp16/bf16 on CPU: ratio 0 exact, merged outputs finite, same token counts as in fp32."""
    torch.manual_seed(0)
    preset = PRESETS[name]
    model = build_denoiser(preset)
    inputs = denoiser_inputs(preset, batch_size=2)
    steps = 4
    apply_SDTM(model, num_inference_steps=steps, protect_steps_frequency=-1)
    for _ in range(steps):
        forward(model, inputs)
    fp32_counts = get_merge_state(model).token_counts

    model = model.to(dtype)
    low = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    remove_SDTM(model)
    base = forward(model, low)
    apply_SDTM(model, num_inference_steps=steps, ratio=0.0, deviation=0.0)
    assert torch.equal(forward(model, low), base)
    apply_SDTM(model, num_inference_steps=steps, protect_steps_frequency=-1)
    outs = [forward(model, low) for _ in range(steps)]
    assert all(o.dtype == dtype and torch.isfinite(o).all() for o in outs)
    assert not torch.equal(outs[0], base)
    assert get_merge_state(model).token_counts == fp32_counts
    remove_SDTM(model)


def test_fp16_merges_of_large_tokens_do_not_overflow():
    """Regression: fp16 sums of merged tokens overflowed (2 x 40000 > 65504); similarities of large tokens too.

    Group means and similarities never form a sum or a dot product larger than their inputs' magnitude.
    """
    grid = WindowGrid.build((2, 2), 2, 2, torch.device("cpu"))
    x = torch.full((1, 4, 8), 40000.0, dtype=torch.float16)
    for merge in (window_merge(x, grid, 1), bipartite_merge(x, grid, 3)):
        merged = merge.merge(x)
        assert merged.dtype == torch.float16 and torch.isfinite(merged).all() and (merged == 40000).all()
        assert merge.num_rows == 1 and torch.equal(merge.unmerge(merged), x)


def test_bf16_pipeline(tiny_pipe):
    pipe = tiny_pipe.to(torch.bfloat16)
    base = generate_pixart(pipe, steps=3)
    apply_SDTM(pipe, ratio=0.0, deviation=0.0)
    assert torch.equal(generate_pixart(pipe, steps=3), base)
    apply_SDTM(pipe)
    merged = generate_pixart(pipe, steps=3)
    assert merged.dtype == torch.bfloat16 and torch.isfinite(merged).all() and not torch.equal(merged, base)


def test_model_cpu_offload_either_order_and_removal_keeps_offload(tiny_pipe, monkeypatch):
    """`enable_model_cpu_offload` needs an accelerator by default; device="cpu" runs accelerate's hooks on CPU.

    Regressions: removal dropped accelerate's wrapper (patch, offload, remove); accelerate's per-call hook reset
    dropped the step hook (offload, patch: the second call raised).
    """
    from accelerate.hooks import CpuOffload

    transformer = tiny_pipe.transformer
    calls = []
    pre_forward = CpuOffload.pre_forward
    monkeypatch.setattr(CpuOffload, "pre_forward", lambda self, module, *a, **k: (
        calls.append(module is transformer), pre_forward(self, module, *a, **k))[1])
    apply_SDTM(tiny_pipe)
    reference = generate_pixart(tiny_pipe, steps=4)
    tiny_pipe.enable_model_cpu_offload(device="cpu")  # after patching
    for _ in range(2):
        assert torch.equal(generate_pixart(tiny_pipe, steps=4), reference)
    assert sum(calls) == 8
    remove_SDTM(tiny_pipe)
    unpatched = generate_pixart(tiny_pipe, steps=4)
    assert sum(calls) == 12 and not torch.equal(unpatched, reference)
    apply_SDTM(tiny_pipe)  # after offloading
    for _ in range(2):
        assert torch.equal(generate_pixart(tiny_pipe, steps=4), reference)
        assert len(get_merge_state(tiny_pipe).token_counts) == 4
    assert sum(calls) == 20
    remove_SDTM(tiny_pipe)
    assert torch.equal(generate_pixart(tiny_pipe, steps=4), unpatched) and sum(calls) == 24


@pytest.mark.parametrize("latent_hw", [(14, 10), (18, 12)])
@pytest.mark.parametrize("window", [2, 3])
def test_odd_and_non_square_grids(latent_hw, window):
    """Bare PixArt on 7x5 and 9x6 token grids with windows that do not divide them."""
    torch.manual_seed(0)
    preset = PRESETS["tiny"]
    model = build_denoiser(preset)
    inputs = denoiser_inputs(preset, batch_size=2)
    inputs["hidden_states"] = torch.randn(2, 4, *latent_hw)
    grid = (latent_hw[0] // 2, latent_hw[1] // 2)
    n, windows = grid[0] * grid[1], windows_of(grid, window, window)
    steps = 5
    rec = Recorder(model, merged_modules("tiny", model))
    apply_SDTM(model, num_inference_steps=steps, sx=window, sy=window, switch_step=30, deviation=0.1)
    outs = [forward(model, inputs) for _ in range(steps)]
    apply_ToMe(model, num_inference_steps=1, sx=window, sy=window)
    outs.append(forward(model, inputs))
    rec.remove()
    assert all(o.shape == (2, 8, *latent_hw) and torch.isfinite(o).all() for o in outs)
    for i, row in enumerate(rec.steps[:steps]):
        attn, mlp = sdtm_kept(i, steps, grid, sx=window, sy=window, deviation=0.1, switch_step=30)
        assert set(row.values()) <= {attn, mlp} and row[(1, "attn")] == attn and row[(1, "mlp")] == mlp
    assert rec.steps[-1][(0, "attn")] == tome_kept(n, windows) and rec.steps[-1][(0, "mlp")] == n
    assert any(v < n for row in rec.steps for v in row.values())


def test_resolution_change_between_calls(tiny_pipe):
    """One patched pipeline, 32x32 -> 48x40 (12x10 tokens, 3x3 windows leave a loose row) -> 32x32 again."""
    apply_SDTM(tiny_pipe, sx=3, sy=3)
    rec = Recorder(tiny_pipe.transformer, merged_modules("tiny", tiny_pipe.transformer))
    first = generate_pixart(tiny_pipe, steps=4)
    other = generate_pixart(tiny_pipe, steps=4, height=48, width=40)
    assert other.shape == (1, 4, 24, 20) and torch.isfinite(other).all()
    assert get_merge_state(tiny_pipe).grid == (12, 10)
    assert torch.equal(generate_pixart(tiny_pipe, steps=4), first)  # nothing of the other size leaks back
    rec.remove()
    for call, grid in enumerate([(8, 8), (12, 10), (8, 8)]):
        for i, row in enumerate(rec.steps[4 * call : 4 * call + 4]):
            assert set(row.values()) == set(sdtm_kept(i, 4, grid, sx=3, sy=3)), (call, i)
