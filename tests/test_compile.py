"""What a GPU needs of the merge path, checked on the CPU: a patched model compiles with `fullgraph=True` into a few
graphs that a second generation reuses, no host sync in a merged forward once a generation runs, and merge ops
that dynamo captures in one graph (issue 25)."""

import dataclasses

import pytest
import torch
import torch._dynamo
from diffusers.hooks import FirstBlockCacheConfig
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.models import PRESETS, build_denoiser, denoiser_inputs, load_pipeline, wan_call_size
from sdtm_plugin import SDTMConfig, apply_SDTM, apply_token_cache, apply_ToMe, get_merge_state, remove_SDTM
from sdtm_plugin.grid import WindowGrid
from sdtm_plugin.merge import bipartite_merge, choose_destinations, window_merge

# ops whose result the host must wait for (a CUDA stream sync): a scalar read, or an output shape set by the values
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "unique",
                 "_unique2", "unique_consecutive"}


class HostSyncRecorder(TorchDispatchMode):
    """Records every host-sync op with the transformer call it ran in (`call` is set from outside)."""

    def __init__(self) -> None:
        super().__init__()
        self.call = 0
        self.syncs: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in HOST_SYNC_OPS:
            self.syncs.append((self.call, func.__name__))
        return func(*args, **(kwargs or {}))


def _generate(model, pipe, steps=6):
    kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(0)}
    if model == "tiny-dit":
        return pipe(class_labels=[1], output_type="pt", **kwargs).images
    if model == "tiny":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    if model == "tiny-flux":
        kwargs.update(height=32, width=32, max_sequence_length=16)
    if model == "tiny-wan":
        return pipe("a red cat", output_type="latent", max_sequence_length=16, **wan_call_size(PRESETS[model]),
                    **kwargs).frames
    return pipe("a red cat", output_type="latent", **kwargs).images


@pytest.mark.parametrize("model,apply", [("tiny", apply_SDTM), ("tiny", apply_ToMe), ("tiny-sd3", apply_SDTM),
                                         ("tiny-dit", apply_SDTM), ("tiny-flux", apply_SDTM),
                                         ("tiny-wan", apply_SDTM), ("tiny", apply_token_cache),
                                         ("tiny-flux", apply_token_cache)])
def test_merged_forwards_after_the_first_make_no_host_sync(model, apply, tiny_pipe_dir):
    """Once a generation's first forward has set it up (window tables, the schedule position), a merged forward runs
    without any op that makes the host wait for the device, so CUDA graphs and an asynchronous stream stay possible.
    The unpatched pipeline is recorded too, so a sync of the model's own code does not count."""
    pipe = load_pipeline(model, cache_dir=tiny_pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    recorder = HostSyncRecorder()
    pipe.transformer.register_forward_pre_hook(lambda module, args: setattr(recorder, "call", recorder.call + 1))
    after_first = {}
    for label in ("bare", "merged"):
        if label == "merged":
            apply(pipe)
        recorder.call, recorder.syncs = 0, []
        with recorder:
            _generate(model, pipe)
        after_first[label] = sorted(op for call, op in recorder.syncs if call > 1)
    merged_rows = [n for step in get_merge_state(pipe).token_counts[1:] for n in step["attn"] + step["mlp"] if n]
    assert min(merged_rows) < max(merged_rows), "no step merged: the check would be vacuous"
    assert after_first["merged"] == after_first["bare"], after_first


class GraphCounter:
    """A torch.compile backend that runs graphs as traced (eager) and counts them: each graph is one compilation."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _signatures(state) -> set:
    """Distinct (phase, merged token counts per block) of the last generation's forwards."""
    return {(r.phase, *(tuple(r.tokens[role]) for role in ("attn", "mlp"))) for r in state.records}


APPLY = {"sdtm": apply_SDTM, "tome": apply_ToMe, "fast": lambda pipe: apply_SDTM(pipe, SDTMConfig.fast()),
         "sketched": lambda pipe: apply_SDTM(pipe, match_dim=8),
         "spatio-temporal": lambda pipe: apply_SDTM(pipe, st=2), "tokencache": apply_token_cache,
         "keys-only": lambda pipe: apply_SDTM(pipe, merge_queries=False),
         "proportional": lambda pipe: apply_SDTM(pipe, proportional_attention=True),
         "offloaded": lambda pipe: apply_SDTM(pipe, cache_offload=True),
         "tokencache-offloaded": lambda pipe: apply_token_cache(pipe, cache_offload=True),
         "tokencache-keys": lambda pipe: apply_token_cache(pipe, cache_keys=True),
         "ibtm": lambda pipe: apply_SDTM(pipe, idm_destination="guidance")}


@pytest.mark.parametrize("model,method,order", [
    ("tiny", "sdtm", "compile, apply"), ("tiny", "tome", "compile, apply"), ("tiny", "fast", "apply, compile"),
    ("tiny", "sdtm", "apply, compile in place"), ("tiny-sd3", "sdtm", "apply, compile"),
    ("tiny-sd3", "tome", "compile, apply"), ("tiny-dit", "sdtm", "compile, apply"), ("tiny", "sketched", "compile, apply"),
    ("tiny-flux", "sdtm", "compile, apply"), ("tiny-flux", "tome", "apply, compile"),
    ("tiny-wan", "spatio-temporal", "compile, apply"), ("tiny-wan", "tome", "apply, compile"),
    ("tiny", "tokencache", "compile, apply"), ("tiny-flux", "tokencache", "apply, compile"),
    ("tiny-wan", "tokencache", "compile, apply"), ("tiny-flux", "keys-only", "compile, apply"),
    ("tiny", "offloaded", "compile, apply"), ("tiny-flux", "tokencache-offloaded", "apply, compile"),
    ("tiny", "proportional", "compile, apply"), ("tiny-flux", "proportional", "apply, compile"),
    ("tiny", "tokencache-keys", "compile, apply"), ("tiny-flux", "tokencache-keys", "apply, compile"),
    ("tiny", "ibtm", "apply, compile"),
])
def test_patched_model_compiles_fullgraph_and_a_second_generation_compiles_nothing(model, method, order,
                                                                                   tiny_pipe_dir):
    """`torch.compile(transformer, fullgraph=True)` of a patched transformer (either order, or `.compile()` in place):
    no graph break (fullgraph raises on any), one graph per distinct merged layout (token budget x phase) plus the
    first forward's, none new in a second generation, and the images of eager merging."""
    pipe = load_pipeline(model, cache_dir=tiny_pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    APPLY[method](pipe)
    eager = _generate(model, pipe, steps=12)
    remove_SDTM(pipe)

    torch._dynamo.reset()
    counters.clear()
    backend = GraphCounter()
    if order == "compile, apply":
        pipe.transformer = torch.compile(pipe.transformer, backend=backend, fullgraph=True)
        APPLY[method](pipe)
    elif order == "apply, compile":
        APPLY[method](pipe)
        pipe.transformer = torch.compile(pipe.transformer, backend=backend, fullgraph=True)
    else:
        APPLY[method](pipe)
        pipe.transformer.compile(backend=backend, fullgraph=True)
    compiled = _generate(model, pipe, steps=12)
    first = backend.graphs
    state = get_merge_state(pipe)
    layouts = _signatures(state)
    again = _generate(model, pipe, steps=12)

    assert sum(counters["graph_break"].values()) == 0
    assert backend.graphs == first, "the second generation compiled new graphs"
    merged_rows = [n for _, attn, mlp in layouts for n in attn + mlp if n]
    assert min(merged_rows) < max(merged_rows), "nothing merged: the check would be vacuous"
    assert first <= len(layouts) + 2, (first, layouts)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, compiled)
    remove_SDTM(pipe)
    torch._dynamo.reset()


class FrameCounter(GraphCounter):
    """`GraphCounter` that also counts graphs per compiled code object (under regional compilation: per block class)."""

    def __init__(self):
        super().__init__()
        self.frames: dict[int, int] = {}

    def __call__(self, gm, example_inputs):
        frame = torch._guards.CompileContext.current_compile_id().frame_id
        self.frames[frame] = self.frames.get(frame, 0) + 1
        return super().__call__(gm, example_inputs)


REGIONAL_STEPS = 8
REGIONAL = {
    "sdtm": lambda model: apply_SDTM(model, num_inference_steps=REGIONAL_STEPS),
    "tome": lambda model: apply_ToMe(model, ratio=0.5, num_inference_steps=REGIONAL_STEPS),
    "tokencache": lambda model: apply_token_cache(model, num_inference_steps=REGIONAL_STEPS),
    "tokencache-keys": lambda model: apply_token_cache(model, num_inference_steps=REGIONAL_STEPS, cache_keys=True),
    "proportional": lambda model: apply_SDTM(model, num_inference_steps=REGIONAL_STEPS, proportional_attention=True),
    "sdtm+fbcache": lambda model: apply_SDTM(model, num_inference_steps=REGIONAL_STEPS,
                                             step_cache=FirstBlockCacheConfig(threshold=0.05)),
}


def _deeper(name: str, depth: int):
    """A tiny preset with `depth` blocks of each class (FLUX: double- and single-stream)."""
    preset = PRESETS[name]
    single = {"num_single_layers": depth} if preset.family == "flux" else {}
    return dataclasses.replace(preset, denoiser={**preset.denoiser, "num_layers": depth, **single})


@pytest.mark.parametrize("method", list(REGIONAL))
@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_regional_compilation_compiles_per_block_class_not_per_block(name, method):
    """`compile_repeated_blocks(fullgraph=True)`, as diffusers recommends for FLUX and Wan, then the patch: no graph
    break, dynamo's default recompile limit never hit, a second generation compiles nothing, the outputs of eager
    merging, and the same graphs with twice the blocks. A block class compiles at most one graph per distinct merged
    layout of the generation (phase x token budget) for its merged blocks and one for its protected ones, plus one for
    the first forward (caches still empty). A step cache's own hooks break the graph where they decide from a value
    (diffusers disables compilation there), so with one composed the blocks compile without `fullgraph`: then the
    outputs and the independence from depth are asserted (the graphs of diffusers' hook code between its breaks
    follow its Python state)."""
    fullgraph = "cache" not in method
    graphs = {}
    for depth in (3, 5):  # a step cache hooks its first, middle and last blocks differently: three at least
        preset = _deeper(name, depth)
        torch.manual_seed(0)
        model = build_denoiser(preset).eval()
        inputs = denoiser_inputs(preset)

        def generate():
            with torch.no_grad():
                return torch.stack([model(**inputs, return_dict=False)[0] for _ in range(REGIONAL_STEPS)])

        REGIONAL[method](model)
        eager = generate()
        remove_SDTM(model)
        torch._dynamo.reset()
        counters.clear()
        backend = FrameCounter()
        model.compile_repeated_blocks(backend=backend, fullgraph=fullgraph)
        REGIONAL[method](model)
        compiled = generate()
        first = dict(backend.frames)
        records = get_merge_state(model).records
        layouts = {(r.phase, tuple(r.tokens["attn"]), tuple(r.tokens["mlp"])) for r in records}
        again = generate()

        if fullgraph:
            assert sum(counters["graph_break"].values()) == 0
            assert backend.frames == first, "the second generation compiled new graphs"
            assert len(first) == (2 if preset.family == "flux" else 1)  # one compiled code object per block class
            assert max(first.values()) <= 2 * len(layouts) + 1, (first, layouts)
            assert torch.equal(again, compiled)
        assert any(t is not None and t < n for r in records for role in ("attn", "mlp")
                   for t, n in zip(r.tokens[role], r.grid_tokens)), "nothing merged: the check would be vacuous"
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        graphs[depth] = sorted(first.values())
        remove_SDTM(model)
        torch._dynamo.reset()
    assert graphs[3] == graphs[5], graphs


def test_local_matching_tables_are_built_outside_the_compiled_region(tiny_pipe_dir, monkeypatch):
    """Window-local matching's neighbour tables are built eagerly before the forward: inductor fails to compile their
    gathers when it computes the indices itself inside the graph ("vr must not be None")."""
    from sdtm_plugin.grid import WindowGrid

    built_while_tracing = []
    original = WindowGrid._neighbour_tables

    def record(self, radius):
        built_while_tracing.append(torch.compiler.is_compiling())
        return original(self, radius)

    monkeypatch.setattr(WindowGrid, "_neighbour_tables", record)
    pipe = load_pipeline("tiny", cache_dir=tiny_pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager", fullgraph=True)
    apply_SDTM(pipe, match_radius=1)
    _generate("tiny", pipe)
    assert built_while_tracing and not any(built_while_tracing)
    torch._dynamo.reset()


class SdpaRecorder(torch.overrides.TorchFunctionMode):
    """Query lengths of every fused attention call, and every explicit softmax (an attention map built by hand)."""

    def __init__(self):
        super().__init__()
        self.lengths, self.softmaxes = [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.lengths.append(args[0].shape[-2])
        elif func in (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax):
            self.softmaxes += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model", ["tiny", "tiny-sd3"])
def test_merged_attention_stays_fused(model, tiny_pipe_dir):
    """The merged sequence goes through PyTorch's fused attention (SDPA, which dispatches to flash / memory-efficient /
    cuDNN kernels on a GPU) at the merged length, never through an explicit attention map."""
    pipe = load_pipeline(model, cache_dir=tiny_pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    apply_SDTM(pipe)
    recorder = SdpaRecorder()
    with recorder:
        _generate(model, pipe)
    merged = {n for step in get_merge_state(pipe).token_counts for n in step["attn"] if n and n < 64}
    assert merged and merged <= set(recorder.lengths) and recorder.softmaxes == 0


def _merges(radius):
    grid = WindowGrid.build((10, 11), 2, 2, torch.device("cpu"))  # odd grid: loose tokens in the last row / column

    def sdtm_detail(x, cache):
        merge = bipartite_merge(x, grid, 30, choose_destinations(grid, x.shape[0], torch.rand(x.shape[0], 25, 4)),
                                radius=radius)
        return merge.unmerge(merge.merge(x) * 2, cache, 0.5)

    def sdtm_structure(x, cache):
        merge = window_merge(x, grid, 6, torch.rand(x.shape[0], grid.num_windows), 0.3)
        return merge.unmerge(merge.merge(x) + 1, cache, 0.8)

    return grid, {"detail": sdtm_detail, "structure": sdtm_structure}


@pytest.mark.parametrize("radius", [None, 1])
def test_merge_ops_make_no_host_sync_even_inside_an_op(radius):
    """The profiler sees the ops an ATen kernel calls itself (a dispatch mode does not), e.g. the length checks of
    `segment_reduce`: building a merge, merging and unmerging calls none that reads a value back to the host."""
    grid, functions = _merges(radius)
    x, cache = torch.randn(2, grid.num_tokens, 16), torch.randn(2, grid.num_tokens, 16)
    for phase, function in functions.items():
        function(x, cache)  # the grid's cached tables are built once, outside the steady state
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            function(x, cache)
        syncs = {e.name for e in profiler.events()} & {f"aten::{op}" for op in HOST_SYNC_OPS}
        assert not syncs, (phase, syncs)


@pytest.mark.parametrize("radius", [None, 1])
def test_merge_ops_compile_into_one_graph(radius):
    """Building a merge, merging and unmerging with a cache blend: one graph, no break, for both SDTM phases and the
    window-local match; the compiled function equals the eager one."""
    grid, functions = _merges(radius)
    x, cache = torch.randn(2, grid.num_tokens, 16), torch.randn(2, grid.num_tokens, 16)
    for phase, function in functions.items():
        explained = torch._dynamo.explain(function)(x, cache)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (phase, explained.break_reasons)
        torch.manual_seed(0)
        eager = function(x, cache)
        torch.manual_seed(0)
        compiled = torch.compile(function, backend="eager", fullgraph=True)(x, cache)
        torch.testing.assert_close(compiled, eager)
