"""A fixed sample of the transformers zoo (``tests/zoo.py``, ``make zoo``): each family generates
eager's tokens and logits through ``hf.accelerate``, within its graph bound, taking the routes its
kind allows. One family per kind of model the full sweep showed a problem with."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import zoo

EVERY = {"prepared", "masks", "packed_prefill", "decode_prefill", "decode_mask"}


@dataclass(frozen=True)
class Case:
    taken: set[str]
    """Routes the family must take."""
    not_taken: set[str] = field(default_factory=set)
    """Routes it must not take."""
    dynamic: int = 2
    """Graphs on the first pass with a dynamic cache (two calls: a padded batch, one prompt)."""
    static: int = 2
    """The same with a static cache."""


SAMPLE: dict[str, Case] = {
    "llama": Case(EVERY, static=1),
    # asks its cache its length (the packed prefill's cache was no Cache: a crash)
    "opt": Case({"prepared", "packed_prefill"}),
    # multi-query attention: one KV head
    "gpt_bigcode": Case({"prepared", "packed_prefill"}),
    # MLA: key and value head sizes differ (packed buffers were sized from config.head_dim);
    # its expand_kv copies into a slice, which Dynamo guards on a batch of 1
    "deepseek_v3": Case({"prepared", "packed_prefill"}, dynamic=4),
    # its decoder layer drops the keywords it gets: packed, its prompts would see each other
    "stablelm": Case({"prepared"}, {"packed_prefill"}),
    # computes attention itself and adds the mask as floats: a plain compile (was wrong)
    "gpt_neox_japanese": Case(set(), {"prepared"}, dynamic=8, static=8),
    # ALiBi from the 2-D mask, its own attention: a plain compile (was a crash)
    "bloom": Case(set(), {"prepared"}, dynamic=8, static=8),
    # a sliding window with a static cache (its length was marked dynamic: a crash); a static
    # sliding layer branches on a Python int (prefill, filling, full)
    "mistral": Case({"prepared", "masks"}, {"packed_prefill"}, static=3),
    # soft-capping and attention sinks: the model's own eager function (SDPA refused the first,
    # the second was dropped), whose .contiguous() Dynamo guards on a batch of 1
    "gemma2": Case({"prepared"}, {"packed_prefill"}, dynamic=3, static=3),
    "gpt_oss": Case({"prepared"}, {"packed_prefill"}, dynamic=3, static=3),
    # builds causal masks where its config names a window (Hugging Face's builder made
    # sliding ones: wrong); its masks are built in the graph, calls differ in their keywords
    "moshi": Case({"prepared"}, {"masks"}, dynamic=4, static=3),
    # sparse attention: the indexer's top-k key indices, folded into the mask as the model does
    # for SDPA (they were passed on to its SDPA function, which ignores them)
    "deepseek_v32": Case({"prepared", "masks"}, {"packed_prefill"}, dynamic=5, static=3),
    # concatenates a float bias onto its mask before attention, as eager's mask (the boolean
    # SDPA mask turned the bias around); eager generate() fails with a static cache
    "deepseek_v4": Case({"prepared", "masks"}, dynamic=6),
    # hybrid: linear-attention layers beside attention layers, a cache of both
    "qwen3_next": Case({"prepared"}, {"packed_prefill"}, dynamic=4, static=4),
}


@pytest.mark.parametrize("family", sorted(SAMPLE))
def test_family_generates_eagers_answers(family):
    case = SAMPLE[family]
    result = zoo.run_family(family, calls=zoo.CALLS[:2])
    assert result.outcome == "equal", f"{family}: {result.outcome}: {result.detail}"
    assert result.max_logit_error <= zoo.ATOL
    routes = dict(result.routes)
    assert {name for name in case.taken if not routes[name]} == set(), result.detail
    assert {name for name in case.not_taken if routes[name]} == set(), result.detail
    assert result.graphs["dynamic"] <= case.dynamic, result.graphs
    assert result.graphs.get("static", 0) <= case.static, result.graphs
    assert result.graphs["second pass"] == 0
