"""Size marks and tracing settings that exist only while Dynamo compiles a call.

``hf.accelerate`` marks the sizes that vary between calls (batch, query and KV lengths) dynamic,
and traces with two private symbolic-shape settings (``backed_size_oblivious``: a marked size of
1 stays a symbol; no duck sizing: equal sizes stay separate symbols). Dynamo reads both only
while it traces a frame, and its guards accept later inputs that carry no marks (a marked input
must be marked on a subset of the compiled dynamic dims; an unmarked one always passes). Applying
them on every call would cost every decode step an alias per tensor, a mark per varying size and
two settings set and restored, for nothing once the call's graph is compiled.

So a call only announces itself (``compiling``): it pushes a function computing its marks onto a
per-thread stack. Dynamo runs its compile-start callbacks (``torch._dynamo.callback``) before it
traces a frame; ours applies the settings and the marks of the innermost call announced in that
thread, remembering what each tensor carried before; the end callback, run when the compile
finishes or fails, puts both back. The caller's tensors come out as they went in.

Dynamo runs the callbacks only around the outermost of overlapping compiles, counted process-wide:
a compile that starts while another is open (AOTAutograd's lazy backward, a CUDA-graph
re-record, another thread's frame) runs no callback, and the end callback can run in another
thread than the start. The settings are per thread (torch's config overrides are context
variables), the marks are on tensors any thread sees. So what a start applied is kept
process-wide (``_OPEN``) and with the call that was announced: the end callback takes the marks
off in whatever thread it runs, and the settings if it runs in the thread that set them; the
announced call itself, once it returns (its compile is over by then), takes off whatever is
left. Compiles Dynamo starts for other reasons than tracing a frame apply nothing.

A compile that fails (a Dynamo error while tracing, such as a fake-tensor shape error under
``backed_size_oblivious``) does not fail the call: the end callback, run in the ``finally``
around the compile, sees the exception in flight and sets Dynamo's ``suppress_errors`` in that
thread until the call returns, so Dynamo runs the frame as it is (eager's answer, as
``suppress_errors`` does), and the call reports the failure (``compiling.failure``): its caller
compiles the next calls without the settings.

Sizes are marked with ``maybe_mark_dynamic``: where the model's code needs a marked size to be a
constant (a sliding window's length, a shape it branches on), Dynamo specialises it and the call
compiles one more graph, instead of failing the compile with a constraint violation.

Where this torch has no compile callbacks, the marks and settings are applied around the call
instead (the way it was done before), and taken off after it.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch._dynamo import config as dynamo_config
from torch._dynamo.callback import CallbackTrigger
from torch._dynamo.exc import Unsupported, UserError
from torch.fx.experimental import _config as fx_config

__all__ = ["Marks", "compiling"]

Marks = Iterable[tuple[torch.Tensor, Sequence[int]]]
"""Each tensor with the dims to mark dynamic; its other dims of size 1 are marked static."""

SETTINGS: dict[str, object] = {"backed_size_oblivious": True, "use_duck_shape": False}
"""``torch.fx.experimental._config`` while an announced call compiles (those this torch has)."""

_LOCAL = threading.local()
log = logging.getLogger("xy_inductor")


def _stack(name: str) -> list:
    stack = getattr(_LOCAL, name, None)
    if stack is None:
        stack = []
        setattr(_LOCAL, name, stack)
    return stack


class _Applied:
    """What one compile changed: the settings' previous values (in the thread that set them) and
    each marked tensor's previous ``_dynamo_*`` attributes (mark_dynamic adds to sets in place, so
    they are copied)."""

    def __init__(
        self,
        marks: Callable[[Any], Marks],
        arg: Any,
        settings: Mapping[str, object],
        call: compiling | None = None,
    ) -> None:
        self.thread = threading.get_ident()
        self.call = call
        """The announced call whose compile this is (None: applied around a call, no compile)."""
        self.settings = {k: getattr(fx_config, k) for k in settings if hasattr(fx_config, k)}
        self.tensors: list[tuple[torch.Tensor, dict[str, object]]] = []
        try:
            for k in self.settings:
                setattr(fx_config, k, settings[k])
            seen: set[int] = set()
            for t, dims in marks(arg):
                if id(t) not in seen:
                    seen.add(id(t))
                    self.tensors.append((t, _dynamo_attributes(t)))
                _mark(t, dims)
        except BaseException:
            self.undo()  # half-applied: put back what was changed, then fail
            raise

    def undo(self) -> None:
        """Put back what is still on: the marks from any thread, the settings only from the
        thread that set them (another thread's overrides are its own)."""
        if self.settings and threading.get_ident() == self.thread:
            for k, v in self.settings.items():
                setattr(fx_config, k, v)
            self.settings = {}
        for t, before in self.tensors:
            for k in _dynamo_attributes(t):
                delattr(t, k)
            for k, v in before.items():
                setattr(t, k, v)
        self.tensors = []


def _dynamo_attributes(t: torch.Tensor) -> dict[str, object]:
    return {
        k: (v.copy() if isinstance(v, (set, dict)) else v)
        for k, v in vars(t).items()
        if k.startswith(("_dynamo_", "_has_dynamo_"))  # _has_dynamo_dim_marking is guarded on
    }


def _mark(t: torch.Tensor, dims: Sequence[int]) -> None:
    dynamic = {d % t.dim() for d in dims}
    for d in dynamic:
        torch._dynamo.maybe_mark_dynamic(t, d)
    # Dynamo's automatic dynamic remembers sizes per code object, across every compile of the
    # model's class in the process (a plain torch.compile of another instance, say): a 2-D mask
    # seen there makes dim 1 of our 4-D mask a symbol, which tracing with backed_size_oblivious
    # cannot prove to be 1, so the attention op's broadcast check failed the compile.
    for d, size in enumerate(t.shape):
        if size == 1 and d not in dynamic:
            # What mark_static records outside a compile. Inside one (our callback runs inside
            # Dynamo's compile session) mark_static instead specialises a size being traced.
            t.__dict__.setdefault("_dynamo_static_indices", set()).add(d)


_OPEN: list[_Applied] = []
"""What the start callback of the open compile applied (at most one: Dynamo runs the callbacks
around the outermost compile only, under its own lock)."""


def _on_start(args: object) -> None:
    calls = _stack("calls")
    if not calls or getattr(args, "callback_trigger", None) is not CallbackTrigger.DYNAMO:
        return
    call = calls[-1]
    try:
        applied = _Applied(*call.entry, call=call)
    except Exception:
        # Unmarked, the call traces with static sizes: more graphs, never a wrong answer;
        # an exception here would fail the user's compile instead.
        log.warning("xyserve: could not mark the sizes of a call", exc_info=True)
        return
    call.applied.append(applied)
    _OPEN.append(applied)


def _on_end(_args: object) -> None:
    # Run in the `finally` around the compile: a failing compile's exception is in flight.
    error = sys.exc_info()[1]
    while _OPEN:
        applied = _OPEN.pop()
        if error is not None and not isinstance(error, (Unsupported, UserError)):
            applied.call.failed(error, applied.thread)
        applied.undo()


def _handler() -> Any:
    """Dynamo's compile callback handler, or None if this torch has none."""
    handler = getattr(getattr(torch._dynamo, "callback", None), "callback_handler", None)
    if handler is None or not hasattr(handler, "register_start_callback"):
        return None
    return handler


class compiling:
    """``with compiling(marks, arg): compiled(...)``: if Dynamo compiles during the block, the
    symbolic settings are on and ``marks(arg)`` is marked while it does (module docstring).
    ``marks`` is called only then, so a call that runs compiled code pays for a push and a pop."""

    __slots__ = ("applied", "eager", "entry", "failure", "suppress")

    handler: Any = False
    """Dynamo's callback handler (None: this torch has none; False: not looked up yet)."""

    generation: int = 0
    """Bumped each time the callbacks are registered. ``torch._dynamo.reset()`` clears them
    together with every compiled graph, so a new generation means the graphs seen are gone."""

    @classmethod
    def registered(cls) -> int | None:
        """Register the callbacks if they are not (the first call, or after a Dynamo reset);
        the current generation, or None where this torch has no compile callbacks."""
        handler = cls.handler
        if handler is False:
            handler = cls.handler = _handler()
        if handler is None:
            return None
        if _on_start not in handler.start_callbacks:
            handler.register_start_callback(_on_start)
            handler.register_end_callback(_on_end)
            cls.generation += 1
        return cls.generation

    def __init__(
        self,
        marks: Callable[[Any], Marks],
        arg: Any,
        settings: Mapping[str, object] = SETTINGS,
    ) -> None:
        self.entry = (marks, arg, settings)
        self.eager: _Applied | None = None
        self.applied: list[_Applied] = []
        """What each compile of this call applied (module docstring)."""
        self.failure: BaseException | None = None
        """The exception a compile of this call first failed with (Dynamo then ran the frame as
        it is: the call's answer is eager's), or None."""
        self.suppress: bool | None = None
        """Dynamo's ``suppress_errors`` before a failed compile of this call set it."""

    def __enter__(self) -> None:
        # Checked on every call: torch._dynamo.reset() clears the callbacks.
        if compiling.registered() is not None:
            _stack("calls").append(self)
        else:
            self.eager = _Applied(*self.entry)

    def __exit__(self, *exc: object) -> None:
        if self.eager is not None:
            self.eager.undo()
            return
        _stack("calls").pop()
        # Already off where the end callback ran in this thread; otherwise (it runs later, in
        # the thread whose compile overlapped ours) this thread's settings come off here.
        for applied in self.applied:
            applied.undo()
        if self.suppress is not None:
            dynamo_config.suppress_errors = self.suppress

    def failed(self, error: BaseException, thread: int) -> None:
        """A compile of this call, in ``thread``, is failing with ``error``: have Dynamo run the
        frame as it is instead of raising (``suppress_errors``, which it reads after the end
        callback; set in this thread until the call returns)."""
        if self.failure is None:
            self.failure = error
        if threading.get_ident() == thread and self.suppress is None:
            self.suppress = dynamo_config.suppress_errors
            dynamo_config.suppress_errors = True
