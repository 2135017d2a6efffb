"""What ``accelerate`` may do for one model: its routes, each taken or not, with the reason.

The *prepared* route is the base of the others: attention through xyserve's
``AttentionInterface`` function and every call normalised by the wrapper (``accelerator.py``:
caches prepared, sizes marked). On top of it, the masks may be built outside the graph, a
left-padded prefill may run packed, a prefill without padding in the decode graph, and a decode
step's mask may be built directly. A model where the prepared route is not taken runs as a plain
``torch.compile(forward, backend="xyserve")``. ``probe.py`` decides, once per model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["KVShape", "Route", "RouteMismatch", "Routes"]

KVShape = tuple[int, int, int]
"""One cache layer's KV heads, key head size and value head size."""


@dataclass(frozen=True)
class Route:
    """One route: whether ``accelerate`` takes it for the model, and why not if it does not."""

    taken: bool
    reason: str = ""
    """Why the route is not taken (empty when it is)."""


@dataclass(frozen=True)
class Routes:
    """The routes of one accelerated model (module docstring)."""

    prepared: Route
    """Attention through xyserve's function, calls normalised; otherwise a plain compile."""
    masks: Route
    """4-D masks built outside the graph by Hugging Face's builder (otherwise by the model's
    own code, in the graph)."""
    packed_prefill: Route
    """A left-padded prefill runs as one row of its real tokens (``packed.py``)."""
    decode_prefill: Route
    """A prefill without padding runs in the decode graph once one exists."""
    decode_mask: Route
    """A decode step's mask is the padding mask as ``[B, 1, 1, Lk]`` bool, built directly."""
    kv_shapes: tuple[KVShape, ...] = ()
    """Per cache layer, as the probe saw it: KV heads, key and value head sizes."""

    def route_items(self) -> list[tuple[str, Route]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "kv_shapes"]

    def summary(self) -> str:
        """One line: the routes taken, then each one not taken with its reason."""
        if not self.prepared.taken:
            return f"routes: none (plain torch.compile): {self.prepared.reason}"
        taken = [name for name, r in self.route_items() if r.taken]
        left = [f"{name}: {r.reason}" for name, r in self.route_items() if not r.taken]
        text = "routes: " + (", ".join(taken) if taken else "none (plain torch.compile)")
        return text + ("; not taken: " + "; ".join(left) if left else "")


class RouteMismatch(Exception):
    """A route, run eagerly by the probe, did not give what the model gives without it."""
