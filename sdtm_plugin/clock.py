"""Where a patched model is in a generation, and the instrumentation of the pipelines that drive it.

`GenerationClock` holds the step and the call within the step. Progress is the position on the pipeline
scheduler's schedule, not a count of forwards: a generation begins when `set_timesteps` runs, its first step is the
scheduler's `begin_index` (img2img and inpainting start part-way) or, without one, the position of the first
forward's timestep, and every `scheduler.step` moves to the next step. So custom `timesteps` / `sigmas`, `strength`,
early stops and several transformer calls per step (SD3 skip-layer guidance, a separately batched unconditional
pass) all see the real step. A bare model in the user's own loop follows its timesteps: forwards at one timestep are
one step, a timestep going back up begins a new generation; without a timestep, each forward is a step.

`PipelineWatch` is the one place that wraps pipeline methods (and removes the wrappers): the scheduler's
`set_timesteps` and `step`, and the denoising loop's progress bar, whose end (the loop's end, an early stop through
`callback_on_step_end`, an exception inside the loop) ends the generation, so that everything held for the call is
freed when the call ends. Several pipelines may share one patched model, with their own schedulers or one (`from_pipe`): each pipeline is
watched, each scheduler instrumented once.

Not thread-safe: a patched model has one clock and one merge state. A forward from a second thread while another
thread's generation is running raises (`GenerationClock.claim`); run one patched model per thread.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable

MAX_CALLS_PER_STEP = 64  # transformer calls within one step (guidance variants): beyond, the step is not advancing


class GenerationClock:
    """Step and call-within-step of the current generation.

    Attributes:
        num_steps: steps of the schedule (None for a bare model that was not told).
        step: index of the current step on the schedule (-1 before the first forward).
        call: index of the current forward within its step.
        scheduled: a watched scheduler drives the steps (else forwards are counted, `calls_per_step` per step, or
            grouped by timestep when it is None).
        active: a scheduled generation has begun and not ended.
    """

    def __init__(self, num_steps: int | None, calls_per_step: int | None = 1) -> None:
        self.calls_per_step = calls_per_step
        self.owner: int | None = None
        self.begin(num_steps)
        self.active = False

    def begin(self, num_steps: int | None, scheduled: bool = False) -> None:
        self.num_steps = num_steps
        self.step, self.call = -1, 0
        self.scheduled = scheduled
        self.active = scheduled
        self.start: int | None = None  # first step index, resolved at the first forward
        self.completed = 0  # scheduler steps taken since the generation began
        self._last = (-1, -1)
        self._last_timestep: float | None = None  # a bare model's previous forward's timestep
        self.owner = threading.get_ident()

    def scheduler_stepped(self) -> bool:
        """One scheduler step done; True when it was the schedule's last."""
        self.completed += 1
        return self.start is not None and self.num_steps is not None and self.start + self.completed >= self.num_steps

    def end(self) -> None:
        self.active = False

    def claim(self) -> None:
        """Raise if another thread's generation is running on this model."""
        me = threading.get_ident()
        if self.active and self.owner is not None and self.owner != me:
            raise RuntimeError(
                "SDTM: two threads run generations on one patched model at once; its step and merge state are per "
                "model, so their merges would corrupt each other. Use one pipeline (with its own model) per thread, "
                "or serialise the calls with a lock"
            )

    def advance(self, start_index: Callable[[], int], timestep: Callable[[], float | None] = lambda: None) -> bool:
        """Move to the current forward's (step, call); True when a new generation began (bare model wrap-around).

        Args:
            start_index: ``() -> int``, the first step of a scheduled generation (asked once per generation).
            timestep: ``() -> float | None``, the forward's timestep, asked only for a bare model (a host sync where it
                lies on the device): a timestep above the previous forward's begins a new generation (a new loop,
                whether or not the last one ran to its end); with ``calls_per_step=None``, forwards at the previous
                forward's timestep are calls of its step (guidance run as separate forwards).
        """
        if self.scheduled:
            if self.start is None:
                self.start = start_index()
            step = self.start + self.completed
        else:
            t, previous = timestep(), self._last_timestep
            if t is not None and previous is not None and t > previous:  # the timestep went back up: a new loop
                self.begin(self.num_steps)
            last_step, last_call = self._last
            if last_step < 0:
                step = 0
            elif self.calls_per_step is None:
                step = last_step if t is not None and t == previous else last_step + 1
            else:
                step = last_step + (last_call + 1 >= self.calls_per_step)
            if self.num_steps is not None and step >= self.num_steps:  # past the last step: a new generation
                self.begin(self.num_steps)
                step = 0
            self._last_timestep = t
        self.call = self._last[1] + 1 if step == self._last[0] else 0
        if self.call >= MAX_CALLS_PER_STEP:
            raise RuntimeError(
                f"SDTM: {self.call + 1} transformer calls in step {step} of one generation: the pipeline's scheduler "
                "is not stepping (a custom loop with another scheduler?). Apply the patch to the pipeline that runs "
                "the loop, or to the bare transformer with num_inference_steps"
            )
        self.step = step
        self._last = (step, self.call)
        return step == 0 and self.call == 0


class _LoopEnd:
    """A denoising loop's progress bar that calls `on_end` when the loop is left: its end, an early stop, or an
    exception inside it (used as a context manager or, as in the DiT pipeline, as an iterator)."""

    def __init__(self, bar: Any, on_end: Callable[[], None]) -> None:
        self._bar, self._on_end = bar, on_end

    def __enter__(self) -> Any:
        return self._bar.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._bar.__exit__(*exc)
        finally:
            self._on_end()

    def __iter__(self):
        try:
            yield from self._bar
        finally:
            self._on_end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


class PipelineWatch:
    """The instrumentation of the pipelines a patched model was applied through.

    Args:
        claim: ``() -> None``, called before a scheduler sets its timesteps; raises to refuse the generation (before
            the scheduler's state changes).
        on_begin: ``(scheduler) -> None``, a generation begins (the scheduler's timesteps are set).
        on_step: ``() -> None``, the scheduler finished a step.
        on_end: ``() -> None``, the denoising loop was left.
    """

    def __init__(self, claim: Callable[[], None], on_begin: Callable[[Any], None], on_step: Callable[[], None],
                 on_end: Callable[[], None]) -> None:
        self.claim, self.on_begin, self.on_step, self.on_end = claim, on_begin, on_step, on_end
        self._watched: list[dict[str, Any]] = []  # per pipeline: its weak reference, scheduler, progress bar wrapper
        self._schedulers: dict[int, dict[str, Callable]] = {}  # our wrappers, by the id of the scheduler they wrap

    @property
    def pipelines(self) -> list[Any]:
        """The watched pipelines still alive."""
        return [p for p in (w["pipeline"]() for w in self._watched) if p is not None]

    def add(self, pipeline: Any) -> None:
        if any(w["pipeline"]() is pipeline for w in self._watched):
            return
        entry = {"pipeline": weakref.ref(pipeline), "scheduler": None, "live": True}
        original = pipeline.progress_bar
        ends = self.on_end

        @functools.wraps(original)
        def progress_bar(*args, **kwargs):
            bar = original(*args, **kwargs)
            # a wrapper another patch put on top of ours keeps calling it after our removal: then it passes through
            return _LoopEnd(bar, ends) if entry["live"] else bar

        pipeline.progress_bar = entry["progress_bar"] = progress_bar
        self._watched.append(entry)
        self._instrument(entry)

    def refresh(self) -> Any:
        """Instrument the scheduler of a pipeline that got a new one since; returns it when its timesteps are set
        already (it was swapped in after applying, and this call's `set_timesteps` went unseen), else None."""
        begun = None
        for entry in self._watched:
            pipeline = entry["pipeline"]()
            if pipeline is not None and getattr(pipeline, "scheduler", None) is not entry["scheduler"]:
                scheduler = self._instrument(entry)
                if getattr(scheduler, "timesteps", None) is not None:
                    begun = scheduler
        return begun

    def _instrument(self, entry: dict[str, Any]) -> Any:
        """Point `entry` at its pipeline's scheduler, instrumenting that scheduler unless another watched pipeline
        shares it (`from_pipe` shares the scheduler object): one instrumentation per scheduler, so a step counts
        once."""
        self._release_scheduler(entry)
        scheduler = getattr(entry["pipeline"](), "scheduler", None)
        entry["scheduler"] = scheduler
        if scheduler is None or id(scheduler) in self._schedulers:
            return scheduler
        set_timesteps, step = scheduler.set_timesteps, scheduler.step
        key = id(scheduler)

        @functools.wraps(set_timesteps)
        def watched_set_timesteps(*args, **kwargs):
            live = key in self._schedulers  # False once released under another patch's wrapper: pass through
            if live:
                self.claim()
            result = set_timesteps(*args, **kwargs)
            if live:
                self.on_begin(scheduler)
            return result

        @functools.wraps(step)
        def watched_step(*args, **kwargs):
            result = step(*args, **kwargs)
            if key in self._schedulers:
                self.on_step()
            return result

        self._schedulers[key] = wrapped = {"set_timesteps": watched_set_timesteps, "step": watched_step}
        for name, fn in wrapped.items():
            setattr(scheduler, name, fn)
        return scheduler

    def _release_scheduler(self, entry: dict[str, Any]) -> None:
        """Detach `entry` from its scheduler; restore the scheduler's methods when no other entry uses it."""
        scheduler, entry["scheduler"] = entry["scheduler"], None
        if scheduler is None or any(w["scheduler"] is scheduler for w in self._watched):
            return
        for name, fn in self._schedulers.pop(id(scheduler), {}).items():
            if scheduler.__dict__.get(name) is fn:  # else another patch wrapped ours, which now passes through
                delattr(scheduler, name)

    def remove(self) -> None:
        """Restore every wrapped method of every watched pipeline."""
        for entry in self._watched:
            self._release_scheduler(entry)
            entry["live"] = False
            pipeline = entry["pipeline"]()
            if pipeline is not None and pipeline.__dict__.get("progress_bar") is entry["progress_bar"]:
                del pipeline.progress_bar
        self._watched = []
