"""Under torch.autocast, xyserve gives autocast's answers: what autocast casts is left as traced."""

from __future__ import annotations

import pytest
import torch

import xy_inductor
from xy_inductor import workload as wl


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sites_autocast_casts_are_left_alone_with_the_reason(attn):
    # Linear layers come out bfloat16 from float32 inputs, and rotary embeddings leave q and k
    # in float32 beside a bfloat16 v. xyserve.gemm would compute in float32 (the rewrite raised
    # on the dtype difference, logged as an xyserve error); now each site says why it is left.
    model = wl.tiny_model("llama", attn)
    ids, mask = wl.prompt_batch([5, 3], model.config.vocab_size, seed=0)
    compiled = torch.compile(model, backend="xyserve")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids, attention_mask=mask).logits
        got = compiled(input_ids=ids, attention_mask=mask).logits
        report = xy_inductor.explain(model, input_ids=ids, attention_mask=mask)
    assert got.dtype == want.dtype == torch.bfloat16
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=0)
    s = xy_inductor.stats()
    assert s.sites_failed == {} and report.failed == []
    reasons = {reason for _, reason in report.unlowered}
    assert "its result is torch.bfloat16 from torch.float32 inputs (torch.autocast)" in reasons
    assert report.linear_lowered == 0
