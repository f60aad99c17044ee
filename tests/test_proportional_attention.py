"""Proportional attention (`proportional_attention=True`): a merged key weighs in the softmax as its group's tokens
together would. Where a group's tokens are identical, the merged attention then equals the unmerged one exactly."""

import contextlib
import inspect

import pytest
import torch
from conftest import quiet_pipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttention

import test_architectures as arch
import test_flux as flux
import test_wan as wan
from sdtm_plugin import SDTMConfig, ToMeConfig, apply_SDTM, apply_ToMe, remove_SDTM
from sdtm_plugin.grid import WindowGrid
from sdtm_plugin.hooks import KeyBias
from sdtm_plugin.merge import window_merge
from sdtm_plugin.state import BlockSlot

CPU = torch.device("cpu")
C = 32


def _duplicated_windows(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, WindowGrid]:
    """(B, 64, C) tokens of an 8 x 8 grid whose 2 x 2 windows hold four copies of one token each."""
    grid = WindowGrid.build((8, 8), 2, 2, CPU)
    per_window = torch.randn(batch, grid.num_windows, C, generator=torch.Generator().manual_seed(seed))
    x = torch.empty(batch, 64, C)
    x[:, grid.window_tokens.reshape(-1)] = per_window.repeat_interleave(grid.window_size, dim=1)
    return x, grid


def test_key_bias_is_the_log_of_each_rows_group_size():
    x, grid = _duplicated_windows()
    merge = window_merge(x, grid, num_windows=5)
    bias = merge.key_bias()
    assert bias.shape == (2, merge.num_rows) and merge.num_rows == 64 - 5 * 3
    sizes = torch.zeros(2, merge.num_rows).scatter_add_(1, merge.row_of_token, torch.ones(2, 64))
    torch.testing.assert_close(bias.exp(), sizes)
    assert sorted(bias[0].exp().round().tolist()).count(4.0) == 5 and bias.exp().sum(-1).tolist() == [64.0, 64.0]
    assert merge.key_bias(torch.float16).dtype == torch.float16


class _Slot:
    index = 0


def _attend_merged(attn, x, merge, biased: bool, text=None):
    """`attn` over the merged tokens, with the call's key bias when `biased`, unmerged; (image, text) outputs."""
    merged = merge.merge(x)
    args, kwargs = (merged,), {} if text is None else {"encoder_hidden_states": text}
    if biased:
        args, kwargs = KeyBias(attn).apply(args, kwargs, merge, merged, False, _Slot())
        assert kwargs["attention_mask"].shape == (x.shape[0], 1, 1, merge.num_rows + (0 if text is None else text.shape[1]))
    out = attn(*args, **kwargs)
    image, text_out = out if isinstance(out, tuple) else (out, None)
    return merge.unmerge(image), text_out


def test_merged_attention_with_the_key_bias_equals_full_attention_on_duplicated_tokens():
    """PixArt's processor: groups of identical tokens merged with the bias give the unmerged output; without it the
    merged groups are under-weighted and the output moves."""
    torch.manual_seed(0)
    attn = Attention(query_dim=C, heads=2, dim_head=C // 2, processor=AttnProcessor2_0()).eval()
    x, grid = _duplicated_windows()
    merge = window_merge(x, grid, num_windows=8)
    with torch.no_grad():
        full = attn(x)
        biased, _ = _attend_merged(attn, x, merge, biased=True)
        plain, _ = _attend_merged(attn, x, merge, biased=False)
    torch.testing.assert_close(biased, full, atol=1e-5, rtol=1e-5)
    assert (plain - full).abs().max() > 1e-3


def test_joint_attention_biases_image_keys_only():
    """FLUX's joint attention ([text; image] keys): text and image outputs both equal the unmerged call's."""
    torch.manual_seed(0)
    attn = FluxAttention(query_dim=C, heads=2, dim_head=C // 2, added_kv_proj_dim=C).eval()
    x, grid = _duplicated_windows()
    text = torch.randn(2, 5, C)
    merge = window_merge(x, grid, num_windows=8)
    with torch.no_grad():
        full_image, full_text = attn(x, encoder_hidden_states=text)
        image, text_out = _attend_merged(attn, x, merge, biased=True, text=text)
        _, plain_text = _attend_merged(attn, x, merge, biased=False, text=text)
    torch.testing.assert_close(image, full_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_out, full_text, atol=1e-5, rtol=1e-5)
    assert (plain_text - full_text).abs().max() > 1e-3


def test_an_attention_mask_already_given_is_refused():
    attn = Attention(query_dim=C, heads=2, dim_head=C // 2, processor=AttnProcessor2_0())
    x, grid = _duplicated_windows()
    merge = window_merge(x, grid, num_windows=4)
    with pytest.raises(ValueError, match="proportional_attention.*attention_mask already"):
        KeyBias(attn).apply((merge.merge(x),), {"attention_mask": torch.zeros(2, 1, 60)}, merge, merge.merge(x),
                            False, _Slot())


SETTINGS = {apply_SDTM: dict(ratio=0.5, mcw=1.0, protect_steps_frequency=-1), apply_ToMe: dict(ratio=0.5)}


@pytest.mark.parametrize("name", ["tiny", "tiny-dit", "tiny-sd"])
@pytest.mark.parametrize("apply", [apply_SDTM, apply_ToMe])
def test_the_bias_reaches_every_merged_attention(arch_pipes, name, apply):
    """On each supported family the merged self-attentions get the bias (a mask whose exponentials sum to the
    tokens the call's rows stand for), the result moves, and removal leaves the unmerged model."""
    pipe = arch_pipes(name)
    base = arch.generate(name, pipe)
    apply(pipe, **SETTINGS[apply])
    plain = arch.generate(name, pipe)
    apply(pipe, **SETTINGS[apply], proportional_attention=True)
    with _masks_seen(arch.denoiser(pipe)) as seen:
        biased = arch.generate(name, pipe)
    assert seen and all(mask.shape[-1] < tokens for mask, tokens in seen)  # merged calls only
    for mask, tokens in seen:
        torch.testing.assert_close(mask.exp().sum(-1), torch.full_like(mask[..., 0], tokens))
    assert torch.isfinite(biased).all() and not torch.equal(biased, plain)
    remove_SDTM(pipe)
    assert torch.equal(arch.generate(name, pipe), base)


@contextlib.contextmanager
def _masks_seen(model):
    """Yields the (mask, tokens its rows stand for) of every self-attention call of `model` (modules named ``attn1``,
    or ``attn`` in FLUX's blocks) given an attention_mask; the tokens are counted before the merge (image rows and
    a joint attention's text rows)."""
    seen, handles, tokens = [], [], [0]
    attentions = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("attn1", "attn")]
    assert attentions
    processors = [m.processor for m in attentions]

    def count(module, args, kwargs):  # a forward pre-hook runs before the merge hook's forward
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
        text = bound.get("encoder_hidden_states")
        tokens[0] = bound["hidden_states"].shape[1] + (0 if text is None else text.shape[1])

    for module, processor in zip(attentions, processors):
        def record(attn, *args, _processor=processor, **kwargs):
            mask = inspect.signature(_processor.__call__).bind(attn, *args, **kwargs).arguments.get("attention_mask")
            if mask is not None:
                seen.append((mask.float(), tokens[0]))
            return _processor(attn, *args, **kwargs)

        module.processor = record
        handles.append(module.register_forward_pre_hook(count, with_kwargs=True))
    try:
        yield seen
    finally:
        for module, processor, handle in zip(attentions, processors, handles):
            module.processor = processor
            handle.remove()


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_rotary_models_bias_double_single_stream_and_video_attentions(name, tiny_pipe_dir):
    """FLUX (joint [text; image] keys in the double-stream blocks, the joint sequence in the single-stream ones) and
    Wan (video self-attention called positionally): every merged call biased, the text columns at 0."""
    pipe = quiet_pipeline(name, tiny_pipe_dir)
    run = flux.generate if name == "tiny-flux" else wan.generate
    base = run(pipe)
    apply_SDTM(pipe, **SETTINGS[apply_SDTM])
    plain = run(pipe)
    apply_SDTM(pipe, **SETTINGS[apply_SDTM], proportional_attention=True)
    with _masks_seen(pipe.transformer) as seen:
        biased = run(pipe)
    model = pipe.transformer
    blocks = len(getattr(model, "transformer_blocks", getattr(model, "blocks", []))) + len(
        getattr(model, "single_transformer_blocks", []))
    assert blocks and len(seen) >= blocks  # at least a step's merged calls in every block
    for mask, tokens in seen:
        torch.testing.assert_close(mask.exp().sum(-1), torch.full_like(mask[..., 0], tokens))
    if name == "tiny-flux":
        assert all((mask[..., : flux.TEXT] == 0).all() for mask, _ in seen)
    assert torch.isfinite(biased).all() and not torch.equal(biased, plain)
    remove_SDTM(pipe)
    assert torch.equal(run(pipe), base)


def test_unsupported_processors_and_settings_are_refused(arch_pipes):
    with pytest.raises(TypeError, match="proportional_attention.*JointAttnProcessor2_0"):
        apply_SDTM(arch_pipes("tiny-sd3"), proportional_attention=True)
    with pytest.raises(ValueError, match="proportional_attention.*merge_queries=True"):
        SDTMConfig(proportional_attention=True, merge_queries=False)
    with pytest.raises(ValueError, match="proportional_attention.*merge_attn=True"):
        ToMeConfig(proportional_attention=True, merge_attn=False)
    with pytest.raises(ValueError, match="proportional_attention must be"):
        SDTMConfig(proportional_attention=1)


@pytest.fixture(scope="module")
def arch_pipes(tiny_pipe_dir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = quiet_pipeline(name, tiny_pipe_dir)
        remove_SDTM(cache[name])
        return cache[name]

    yield get
    for pipe in cache.values():
        remove_SDTM(pipe)


def test_mask_position_is_found_under_a_hook_registered_before_ours(tiny_pipe_dir):
    """Wan passes its attention mask by position; a hook another library registered on the attention first turns its
    forward into ``(*args, **kwargs)``: the position comes from the class, so the bias still replaces the mask."""
    from diffusers.hooks import HookRegistry, ModelHook

    pipe = quiet_pipeline("tiny-wan", tiny_pipe_dir)
    attentions = [block.attn1 for block in pipe.transformer.blocks]
    for attn in attentions:
        HookRegistry.check_if_exists_or_initialize(attn).register_hook(ModelHook(), "someone_else")
    apply_SDTM(pipe, **SETTINGS[apply_SDTM], proportional_attention=True)
    with _masks_seen(pipe.transformer) as seen:
        assert torch.isfinite(wan.generate(pipe)).all()
    assert len(seen) >= len(attentions)
    remove_SDTM(pipe)
