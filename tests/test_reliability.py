"""What a user's pipeline meets outside the happy path (issue 26): memory after a call, pipelines that share a
model, config copies, step caches composed with merging, float64 on devices without it, U-Net caches, threads."""

import dataclasses
import gc
import threading

import pytest
import torch
from conftest import generate
from test_architectures import pipes  # noqa: F401 (fixture)
from test_sdtm_pipeline import expected_counts, per_step, record_counts

from sdtm_plugin import SDTMConfig, apply_SDTM, apply_step_cache, get_merge_state, remove_SDTM


def live_tensor_bytes(pipe, floating: bool = False) -> int:
    """Census: bytes of every live tensor storage (gc) that is not a parameter or buffer of the pipeline (only those
    of floating-point tensors: activations, caches; not index tables)."""
    gc.collect()
    own = {t.untyped_storage().data_ptr() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
           for t in [*m.parameters(), *m.buffers()]}
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta" and (obj.is_floating_point() or not floating):
            storage = obj.untyped_storage()
            try:
                ptr = storage.data_ptr()
            except RuntimeError:  # fake tensors left by an earlier torch.compile test: no memory
                continue
            if ptr and ptr not in own and ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
    return total


def _call(pipe, name, **kwargs):
    kwargs = {"num_inference_steps": 10, "generator": torch.Generator().manual_seed(0), "output_type": "latent",
              **kwargs}
    if name == "tiny":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    if name == "tiny-flux":
        kwargs.update(height=32, width=32, max_sequence_length=16)
    return pipe("a red cat", **kwargs).images


def _block_input_bytes(pipe, name) -> int:
    """Bytes of the largest (B, N, C) block input of a call with classifier-free guidance."""
    if name == "tiny-sd":
        return 2 * 16 * 16 * pipe.unet.config.block_out_channels[0] * 4
    cfg = pipe.transformer.config
    return 2 * 64 * cfg.num_attention_heads * cfg.attention_head_dim * 4


# -- 2. memory after a call -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny-sd3", "tiny-sd", "tiny-flux"])
def test_a_call_leaves_no_merge_buffers_alive(pipes, name):
    """Live tensors after a call: the patched pipeline holds no activations or caches (the merge cache of the paper
    defaults held 8-9 block inputs of them before the fix), only cached index tables (integers, reused by the next
    call, bounded). 8 steps: the last one merges (FLUX's single-stream blocks kept its merges and rotary tables)."""
    pipe = pipes(name)
    _call(pipe, name, guidance_scale=4.5, num_inference_steps=8)
    unpatched, unpatched_floats = live_tensor_bytes(pipe), live_tensor_bytes(pipe, floating=True)
    apply_SDTM(pipe)
    _call(pipe, name, guidance_scale=4.5, num_inference_steps=8)
    state = get_merge_state(pipe)
    block = _block_input_bytes(pipe, name)
    assert state.held_bytes() == 0 and state.peak_held_bytes > 2 * block
    held = live_tensor_bytes(pipe) - unpatched
    assert held < 2 * block  # index tables (one long per token and table)
    _clear_index_caches()
    assert live_tensor_bytes(pipe, floating=True) - unpatched_floats < 0.01 * block  # no activation, no cache
    assert len(state.token_counts) == 8  # the telemetry stays readable
    _call(pipe, name, guidance_scale=4.5, num_inference_steps=8)
    _call(pipe, name, guidance_scale=4.5, num_inference_steps=8)
    assert live_tensor_bytes(pipe) - unpatched <= held  # bounded: the next calls reuse the tables


@pytest.mark.parametrize("name, config", [("tiny", {}), ("tiny-flux", {}), ("tiny-sd3", {}),
                                          ("tiny", {"method": "tokencache"})])
def test_held_bytes_count_what_a_call_keeps_between_forwards(pipes, name, config):
    """Mid-call, between two forwards, the floating-point tensors alive beyond the unpatched call's are what
    `held_bytes()` reports (merge caches, slopes, staleness, sketches), within one block input of index tables."""
    from sdtm_plugin import apply_token_cache

    pipe = pipes(name)
    seen = {}

    def census(key):
        def look(i):
            if i == 4:
                seen[key] = live_tensor_bytes(pipe, floating=True)
                seen[key + " held"] = get_merge_state(pipe).held_bytes() if get_merge_state(pipe) else 0

        def on_step_end(pipe, i, t, tensors):
            look(i)
            return tensors

        # PixArt's pipeline has the older per-step callback
        return {"callback": lambda i, t, latents: look(i)} if name == "tiny" else {"callback_on_step_end": on_step_end}

    _call(pipe, name, guidance_scale=4.5, num_inference_steps=8, **census("unpatched"))
    if config.get("method") == "tokencache":
        apply_token_cache(pipe)
    else:
        apply_SDTM(pipe)
    _call(pipe, name, guidance_scale=4.5, num_inference_steps=8, **census("patched"))
    extra, held = seen["patched"] - seen["unpatched"], seen["patched held"]
    assert held > 2 * _block_input_bytes(pipe, name)
    assert abs(extra - held) <= 0.05 * held, (extra, held)


def _clear_index_caches():
    """Drop the merge path's cached index tables (per grid, batch and merged counts; reused across calls)."""
    from sdtm_plugin import grid, merge

    merge._layout.cache_clear()
    for table in (grid.WindowGrid.batch_tables, merge.first_token_destinations, grid.WindowGrid.band_mask):
        table.cache_clear()


def test_early_stop_and_an_exception_inside_the_loop_free_the_buffers(pipes, tiny_pipe):
    sd3 = pipes("tiny-sd3")
    apply_SDTM(sd3)
    state = get_merge_state(sd3)

    def stop_after_three(pipe, i, t, tensors):
        assert state.held_bytes() > 0  # mid-call the cache is there
        if i == 2:
            pipe._interrupt = True
        return tensors

    _call(sd3, "tiny-sd3", callback_on_step_end=stop_after_three)
    assert state.held_bytes() == 0 and len(state.token_counts) == 3

    apply_SDTM(tiny_pipe)
    state = get_merge_state(tiny_pipe)

    def fail(i, t, latents):  # PixArt-alpha's callback
        if i == 4:
            raise KeyboardInterrupt  # what a user's Ctrl-C raises inside the loop
        assert state.held_bytes() > 0

    with pytest.raises(KeyboardInterrupt):
        _call(tiny_pipe, "tiny", callback=fail)
    assert state.held_bytes() == 0
    assert torch.isfinite(generate(tiny_pipe)).all() and len(state.token_counts) == 10  # the next call runs


# -- 3. pipelines sharing one model -------------------------------------------------------------------------------------
def _second_pipeline(pipe):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    other = PixArtAlphaPipeline(**{**pipe.components,
                                   "scheduler": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)})
    other.set_progress_bar_config(disable=True)
    return other


@pytest.mark.parametrize("shared_scheduler", [False, True])  # True: one scheduler object, as `from_pipe` shares it
def test_a_shared_model_follows_each_pipeline_it_was_applied_through(tiny_pipe, shared_scheduler):
    from diffusers import PixArtAlphaPipeline

    other = PixArtAlphaPipeline(**tiny_pipe.components) if shared_scheduler else _second_pipeline(tiny_pipe)
    other.set_progress_bar_config(disable=True)
    apply_SDTM(tiny_pipe)
    apply_SDTM(other)  # the same model: the patch now follows both pipelines' schedulers
    seen, handles = record_counts(tiny_pipe)
    generate(tiny_pipe, steps=10)
    first = per_step(seen)
    seen.clear()
    generate(other, steps=6)
    second = per_step(seen)
    seen.clear()
    generate(tiny_pipe, steps=10)
    for h in handles:
        h.remove()
    assert first == expected_counts(10) == per_step(seen)
    assert second == expected_counts(6)
    remove_SDTM(other)  # one patch per model: removing it through either pipeline removes it for both
    assert get_merge_state(tiny_pipe) is None
    assert "progress_bar" not in tiny_pipe.__dict__ and "progress_bar" not in other.__dict__
    assert "step" not in tiny_pipe.scheduler.__dict__ and "step" not in other.scheduler.__dict__
    assert "set_timesteps" not in tiny_pipe.scheduler.__dict__


def test_a_pipeline_the_patch_does_not_follow_gets_a_clear_error(tiny_pipe):
    other = _second_pipeline(tiny_pipe)
    apply_SDTM(tiny_pipe)
    generate(tiny_pipe, steps=4)
    with pytest.raises(RuntimeError, match=r"apply_SDTM\(other_pipe\)"):
        generate(other, steps=4)
    # the pipeline it follows still merges
    seen, handles = record_counts(tiny_pipe)
    generate(tiny_pipe, steps=4)
    for h in handles:
        h.remove()
    assert per_step(seen) == expected_counts(4)


def test_streams_stay_bounded_over_many_calls(tiny_pipe):
    apply_SDTM(tiny_pipe)
    state = get_merge_state(tiny_pipe)
    calls = []

    def count_streams(i, t, latents):
        calls.append(len(state._streams))

    for _ in range(3):
        _call(tiny_pipe, "tiny", num_inference_steps=4, callback=count_streams)
    assert max(calls) == 1  # one transformer call per step (CFG in one batch): one stream, whatever the history


# -- 4. config copies -------------------------------------------------------------------------------------------------
def test_dataclass_replace_follows_the_ratio_unless_deviation_was_given():
    low = dataclasses.replace(SDTMConfig(), ratio=0.1)  # raised before: the resolved 0.2 exceeded the ratio
    assert low.deviation is None and low.effective_deviation == pytest.approx(0.1)
    assert dataclasses.replace(SDTMConfig(ratio=0.1), ratio=0.5).effective_deviation == 0.2  # kept 0.1 before
    assert dataclasses.replace(SDTMConfig(ratio=0.4, deviation=0.05), ratio=0.5).effective_deviation == 0.05
    with pytest.raises(ValueError, match="deviation must be a number in"):
        dataclasses.replace(SDTMConfig(deviation=0.2), ratio=0.1)  # an explicit value still has to fit


# -- 5. FasterCache composed with merging -----------------------------------------------------------------------------
def test_fastercache_sees_the_true_timestep_and_keeps_one_stream(tiny_pipe, monkeypatch):
    """Every timestep FasterCache reads during a forward (its uncond-skip decision included) is that forward's own
    (it read the step before, starting at 0.0 from a fallback), and its conditional-only forwards share the call's
    buffers."""
    from diffusers.hooks import FasterCacheConfig

    config = FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
                               unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 1001),
                               attention_weight_callback=lambda _: 0.5)
    from sdtm_plugin.state import MergeState

    forwards = []  # per forward: its timestep argument, then the values the callback returned during it
    read = MergeState.current_timestep

    def recording(self):
        forwards[-1].append(read(self))
        return forwards[-1][-1]

    monkeypatch.setattr(MergeState, "current_timestep", recording)  # the callback the cache hooks are given
    apply_SDTM(tiny_pipe, step_cache=config)
    state = get_merge_state(tiny_pipe)
    model = tiny_pipe.transformer
    handles = [model.register_forward_pre_hook(lambda m, a, kw: forwards.append([float(kw["timestep"][0])]),
                                               with_kwargs=True)]
    batches, streams = [], []
    handles.append(model.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: batches.append((a[0] if a else kw["hidden_states"]).shape[0]), with_kwargs=True))

    def count_streams(i, t, latents):
        streams.append(len(state._streams))

    _call(tiny_pipe, "tiny", num_inference_steps=8, guidance_scale=4.5, callback=count_streams)
    for handle in handles:
        handle.remove()
    assert len(forwards) == 8 and all(len(reads) > 1 for reads in forwards)
    for timestep, *reads in forwards:
        assert reads == [timestep] * len(reads), (timestep, reads)
    assert 1 in batches and 2 in batches  # some steps computed only the conditional half
    assert max(streams) == 1  # the conditional half uses the trailing rows of the call's buffers


@pytest.mark.parametrize("offload", [False, True])
def test_a_half_batch_reads_and_updates_the_trailing_rows(offload):
    from sdtm_plugin.methods import StreamBuffers

    stream = StreamBuffers(num_layers=1, batch=4, offload=offload)
    buffers = stream.blocks[0]  # what block 0's hooks reach
    full = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3, 2)
    buffers.store_output("mlp", full)
    assert torch.equal(buffers.cached_output("mlp", torch.Size((2, 3, 2)), full.device), full[2:])
    half = -torch.ones(2, 3, 2)
    buffers.store_output("mlp", half)
    kept = buffers.cached_output("mlp", torch.Size((4, 3, 2)), full.device)
    assert torch.equal(kept[:2], full[:2]) and torch.equal(kept[2:], half)
    assert stream.host_bytes() == (full.numel() * 4 if offload else 0)
    assert stream.held_bytes() == (0 if offload else full.numel() * 4)
    if offload:  # a read is a copy: changing it changes the cache only when written back
        kept.zero_()
        assert buffers.cached_output("mlp", full.shape, full.device).abs().sum() > 0
        buffers.update_output("mlp", kept[2:])
        assert buffers.cached_output("mlp", full.shape, full.device)[2:].abs().sum() == 0
    buffers.staleness(2, 3, torch.device("cpu")).fill_(5)  # a view: ageing the half ages the call's rows
    assert stream.staleness(4, 3, torch.device("cpu"))[0, :, 0].tolist() == [0, 0, 5, 5]
    with pytest.raises(ValueError, match="saw 5 images in a forward of 4"):
        buffers.staleness(5, 3, torch.device("cpu"))


# -- 6. no float64 on the scheduler's device --------------------------------------------------------------------------
class _NoFloat64(torch.Tensor):
    """A tensor of a device without float64 (Apple MPS): casting it to float64 raises; `cpu()` leaves the device."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        wants = [a for a in (*args[1:], *kwargs.values()) if a is torch.float64]
        if func in (torch.Tensor.to, torch.Tensor.double, torch.Tensor.type) and (wants or func is torch.Tensor.double):
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype")
        return super().__torch_function__(func, types, args, kwargs)


def test_schedule_positions_never_cast_to_float64_on_the_device(tiny_pipe):
    from sdtm_plugin.state import MergeState

    timesteps = torch.tensor([999.0, 800.0, 600.0]).as_subclass(_NoFloat64)
    with pytest.raises(TypeError, match="float64"):
        timesteps.to(torch.float64)  # the stand-in refuses as the device would
    state = MergeState(SDTMConfig(), num_layers=4)
    state.begin_generation(3, timesteps)
    assert state._timesteps.dtype == torch.float64 and state._timesteps.tolist() == [999.0, 800.0, 600.0]
    apply_SDTM(tiny_pipe)
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("sdtm_step")
    tiny_pipe.scheduler.set_timesteps(3)
    tiny_pipe.scheduler.timesteps = tiny_pipe.scheduler.timesteps.as_subclass(_NoFloat64)
    assert hook._start_index(torch.tensor([tiny_pipe.scheduler.timesteps[1].item()]).as_subclass(_NoFloat64)) == 1


# -- 7. U-Net blocks that never merge cache nothing -------------------------------------------------------------------
def test_unet_blocks_below_max_downsample_cache_nothing(pipes):
    pipe = pipes("tiny-sd")
    apply_SDTM(pipe, max_downsample=1, protect_steps_frequency=2)
    state = get_merge_state(pipe)
    cached_layers = []

    def record(p, i, t, tensors):
        for stream in state._streams.values():  # none after the last step: the generation ended
            cached_layers.append(stream.cached_layers())
        return tensors

    _call(pipe, "tiny-sd", guidance_scale=4.5, callback_on_step_end=record)
    full_resolution = {layer for layer, grid in enumerate(state.layer_grids) if grid == state.grid}
    assert 0 < len(full_resolution) < state.num_layers
    assert set().union(*cached_layers) == full_resolution


# -- 10. threads ------------------------------------------------------------------------------------------------------
def test_a_second_thread_on_a_running_generation_is_a_clear_error(tiny_pipe):
    apply_SDTM(tiny_pipe)
    errors = []

    def other_thread_call(i, t, latents):
        if i == 1:
            worker = threading.Thread(target=lambda: errors.append(_try(lambda: generate(tiny_pipe, steps=2))))
            worker.start()
            worker.join()

    out = _call(tiny_pipe, "tiny", num_inference_steps=4, callback=other_thread_call)
    assert torch.isfinite(out).all()  # the running generation was not disturbed
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError) and "two threads" in str(errors[0])


def _try(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - handed to the asserting thread
        return err
    return None


def test_step_cache_alone_frees_its_merge_state_too(tiny_pipe):
    from diffusers.hooks import FirstBlockCacheConfig

    apply_step_cache(tiny_pipe, FirstBlockCacheConfig(threshold=0.2))
    _call(tiny_pipe, "tiny")
    state = get_merge_state(tiny_pipe)
    assert state.held_bytes() == 0 and not state.clock.active


def test_a_patch_that_keeps_much_of_the_device_memory_warns_once(tiny_pipe, monkeypatch, caplog):
    """With the caches held on the device (`cache_offload=False`), more than `DEVICE_SHARE` of its memory warns."""
    from sdtm_plugin import state as state_module

    apply_SDTM(tiny_pipe, cache_offload=False)
    monkeypatch.setattr(state_module, "device_memory", lambda device: None)
    with caplog.at_level("WARNING", logger="sdtm_plugin.state"):
        _call(tiny_pipe, "tiny", guidance_scale=4.5, num_inference_steps=4)
    assert not caplog.records  # no device memory known (CPU): nothing to compare with
    monkeypatch.setattr(state_module, "device_memory", lambda device: 1 << 16)  # 64 KiB: the tiny cache is more
    with caplog.at_level("WARNING", logger="sdtm_plugin.state"):
        _call(tiny_pipe, "tiny", guidance_scale=4.5, num_inference_steps=4)
        _call(tiny_pipe, "tiny", guidance_scale=4.5, num_inference_steps=4)
    warnings = [r for r in caplog.records if "between forwards" in r.getMessage()]
    assert len(warnings) == 1 and "SDTMConfig keeps" in warnings[0].getMessage()
    monkeypatch.setattr(state_module, "device_memory", lambda device: 1 << 40)
    apply_SDTM(tiny_pipe, cache_offload=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdtm_plugin.state"):
        _call(tiny_pipe, "tiny", guidance_scale=4.5, num_inference_steps=4)
    assert not caplog.records  # well within a large device


def _offload_census(pipe, name, method, **params):
    """(final latents, what the state held on the device / in host memory mid-call, its estimate) of an 8-step
    guided call."""
    from sdtm_plugin import apply_token_cache

    (apply_token_cache if method == "tokencache" else apply_SDTM)(pipe, **params)
    state, seen = get_merge_state(pipe), {}

    def look(i):
        if i == 5:  # past the first full steps: every cache is filled
            seen.update(device=state.held_bytes(), host=state.host_bytes())

    def on_step_end(pipe, i, t, tensors):
        look(i)
        return tensors

    step = {"callback": lambda i, t, latents: look(i)} if name == "tiny" else {"callback_on_step_end": on_step_end}
    out = _call(pipe, name, guidance_scale=4.5, num_inference_steps=8, **step)
    grid = state.grid
    return out, seen, state.cache_estimate(grid, state.batch_size)


@pytest.mark.parametrize("name, method, params", [("tiny", "sdtm", {}), ("tiny-flux", "sdtm", {}),
                                                  ("tiny", "tokencache", {"extrapolation": 1.0}),
                                                  ("tiny-flux", "tokencache", {})])
def test_offloaded_caches_give_the_same_image_and_leave_the_device(pipes, name, method, params):
    """`cache_offload=True` keeps the output caches (and slopes) in host memory: the image is bit-identical to the
    caches kept on the device, the device keeps only counters and sketches (the host exactly the rest), and
    `cache_estimate` sizes it (exact on PixArt; FLUX's single-stream blocks keep fewer than the bound)."""
    pipe = pipes(name)
    kept, on_device, estimate = _offload_census(pipe, name, method, cache_offload=False, **params)
    moved, offloaded, _ = _offload_census(pipe, name, method, cache_offload=True, **params)
    assert torch.equal(kept, moved)
    assert on_device["host"] == 0 and offloaded["host"] > 0
    assert offloaded["device"] + offloaded["host"] == on_device["device"]
    if name == "tiny":
        assert offloaded["host"] == estimate
    else:
        assert offloaded["host"] <= estimate < 1.5 * offloaded["host"]


def test_caches_go_to_host_memory_when_the_device_is_too_small(tiny_pipe, monkeypatch, caplog):
    """`cache_offload=None` (the default) offloads a call whose estimated caches exceed `DEVICE_SHARE` of the GPU's
    memory and says so; on a large GPU, and on the CPU, the caches stay where the model is."""
    from sdtm_plugin import state as state_module

    apply_SDTM(tiny_pipe)
    state = get_merge_state(tiny_pipe)
    estimate = state.cache_estimate((8, 8), 2)
    cfg = tiny_pipe.transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    assert estimate == cfg.num_layers * 2 * 2 * 64 * width * 4  # blocks x (attn, mlp) x 2 images x 64 tokens x C, fp32
    for memory, offloads in [(None, False), (int(estimate / state_module.DEVICE_SHARE) + 1, False),
                             (int(estimate / state_module.DEVICE_SHARE) - 1, True)]:
        monkeypatch.setattr(state_module, "device_memory", lambda device: memory)
        caplog.clear()
        host = []
        with caplog.at_level("INFO", logger="sdtm_plugin.state"):
            _call(tiny_pipe, "tiny", guidance_scale=4.5, num_inference_steps=4,
                  callback=lambda i, t, latents: host.append(state.host_bytes()))
        assert (max(host) == estimate) if offloads else (max(host) == 0)
        assert any("kept in host memory" in r.getMessage() for r in caplog.records) == offloads
        assert not any("between forwards" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("make, message", [
    (lambda: __import__("sdtm_plugin").SDTMConfig(cache_offload="yes"), "cache_offload must be True or False or None"),
    (lambda: __import__("sdtm_plugin").SDTMConfig(mcw=1.0, cache_offload=True), "keeps no merge cache"),
    (lambda: __import__("sdtm_plugin").TokenCacheConfig(ratio=0.0, cache_offload=True), "ratio=0 caches nothing"),
])
def test_cache_offload_settings_that_cannot_work_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()
