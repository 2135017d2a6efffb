"""The ATen provider's attention on rows known by their lengths, on views of the tensors (no
gathers): dense ``[B, Hkv, L, D]`` caches whose rows are contiguous ranges (``run_dense``) and
packed sequences (``run_packed``), through ATen's fused CPU flash kernel. The paged executor
(``paged.py``) and the generic plan executor (``plan_executor.py``) build on the same calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from xy_inductor.kernels.attention_plan import AttentionPlan

__all__ = [
    "SHORT_ROW",
    "attend_row_fused",
    "attend_short_rows",
    "flash_row",
    "fused_flash",
    "run_dense",
    "run_packed",
]

# -- dense layout, rows known by their lengths: no gathers ------------------------------------
#
# When K/V are a dense [B, Hkv, L, D] cache and each row's keys are one contiguous range of it
# (right or left padding), the rows run on views of the cache through ATen's fused CPU flash
# kernel: short rows (decode, verify) all at once against the whole cache, masked per row; long
# rows one by one, their causal square in one call and the keys before it (a prefix-cached or
# chunked prefill) in a second, merged by log-sum-exp.


def attend_short_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_len: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    sees_all: bool = False,
) -> torch.Tensor:
    """Every row at once against the whole dense cache, masked per row: for decode and verify.
    ``sees_all``: the caller knows every query sees every key (no mask is built).

    q ``[B, Hq, T, D]`` (row r's queries in its first q_len[r] slots), k/v ``[B, Hkv, L, D]``
    with row r's keys at ``kv_start[r] : kv_start[r] + kv_len[r]``. Returns ``[B, Hq, T, Dv]``.
    """
    if sees_all:
        return fused_flash(q, k, v, False, scale)[0]
    t, length = q.shape[2], k.shape[2]
    kpos = torch.arange(length, device=q.device)[None, :] - kv_start[:, None]  # [B, L]
    qpos = (kv_len - q_len)[:, None] + torch.arange(t, device=q.device)  # [B, T]
    kpos, qpos = kpos[:, None, None, :], qpos[:, None, :, None]
    ok = (kpos >= 0) & (kpos < kv_len[:, None, None, None])
    if causal:
        ok = ok & (kpos <= qpos)
    # [B, 1, T, L]; when every row sees the whole cache (uniform decode) there is no mask at all.
    mask = (
        None
        if bool(ok.all())
        else torch.zeros(ok.shape, dtype=q.dtype).masked_fill(~ok, float("-inf"))
    )
    return fused_flash(q, k, v, False, scale, attn_mask=mask)[0]


def fused_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's fused CPU flash kernel (``[B, H, L, D]``): output ``[B, Hq, Lq, Dv]`` and
    log-sum-exp. The kernel takes one head size for q, k and v; where the value head size differs
    (DeepSeek's MLA), the smaller side is padded with zeros, which adds nothing to a score
    (``scale`` is explicit) or to an output column kept, and the output is cut back to Dv."""
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        v = F.pad(v, (0, d - dv))
    elif d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale
    )
    return (out if dv == out.shape[-1] else out[..., :dv]), lse


def flash_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """``fused_flash`` on one row (``[H, L, D]`` views): output and log-sum-exp. The kernel
    skips the causal upper triangle block by block itself and reads grouped KV heads."""
    out, lse = fused_flash(q[None], k[None], v[None], causal, scale)
    return out[0], lse[0]


def attend_row_fused(
    q_row: torch.Tensor, k_row: torch.Tensor, v_row: torch.Tensor, *, causal: bool, scale: float
) -> torch.Tensor:
    """One row without a window: queries ``[Hq, ql, D]`` (the row's last ql tokens) over keys
    ``[Hkv, kl, D]``. The causal square runs as one fused call; keys before the row's queries (a
    chunked or prefix-cached prefill) as a second, merged by log-sum-exp. Returns [Hq, ql, Dv]."""
    ql, kl = q_row.shape[1], k_row.shape[1]
    off = kl - ql
    if not causal or off == 0:
        return flash_row(q_row, k_row, v_row, causal, scale)[0]
    o_sq, lse_sq = flash_row(q_row, k_row[:, off:], v_row[:, off:], True, scale)
    o_pre, lse_pre = flash_row(q_row, k_row[:, :off], v_row[:, :off], False, scale)
    lse = torch.logaddexp(lse_sq, lse_pre)
    w_sq = torch.exp(lse_sq - lse)[..., None]
    w_pre = torch.exp(lse_pre - lse)[..., None]
    return (o_sq.float() * w_sq + o_pre.float() * w_pre).to(q_row.dtype)


# Rows with at most this many queries run together against the whole cache (decode, verify).
SHORT_ROW = 16


def run_dense(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_end: Sequence[int],
    kv_start: Sequence[int],
    kv_lens: Sequence[int],
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over a dense cache whose rows are known by their lengths (left or right padded),
    causal or full (``plan`` has no window: rows come from masks of padding).

    q ``[B, Hq, Lq, D]`` with row r's ``plan.table.q_len[r]`` queries ending before
    ``q_end[r]``; k/v ``[B, Hkv, L, D]`` with row r's keys at ``kv_start[r] :
    kv_start[r] + kv_lens[r]``. Query slots outside the rows (padding) are written as zeros, as
    SDPA writes a query that sees no key. Returns ``out [B, Hq, Lq, Dv]``.
    """
    table = plan.table
    plan.check(table.q_len, kv_lens)
    if plan.window is not None:
        raise ValueError("run_dense: rows of a dense cache are planned without a window")
    b, hq, lq, _ = q.shape
    if out is None:
        out = q.new_empty((b, hq, lq, v.shape[3]))
    out.zero_()
    short = [r for r in range(table.rows) if 0 < table.q_len[r] <= SHORT_ROW]
    if short:
        t = max(table.q_len[r] for r in short)
        rows = torch.tensor(short)
        n_q = torch.tensor([table.q_len[r] for r in short])
        first = torch.tensor([q_end[r] for r in short]) - n_q
        j = torch.arange(t)[None, :]
        valid = j < n_q[:, None]  # [n, t]: slot j holds the row's j-th query
        slots = torch.where(valid, first[:, None] + j, 0)
        # Every row short (decode): the cache as it is; a mixed batch copies the short rows.
        every = short == list(range(b))
        # Every row's queries fill q exactly (uniform decode or verify): no gather, no scatter.
        direct = every and t == lq and all(table.q_len[r] == t for r in short)
        qs = q if direct else q[rows[:, None], :, slots].transpose(1, 2)  # [n, Hq, t, D]
        got = attend_short_rows(
            qs,
            k if every else k[rows],
            v if every else v[rows],
            n_q,
            torch.tensor([kv_start[r] for r in short]),
            torch.tensor([kv_lens[r] for r in short]),
            causal=plan.causal,
            scale=scale,
            sees_all=every
            and all(kv_start[r] == 0 and kv_lens[r] == k.shape[2] for r in short)
            and (not plan.causal or all(table.q_len[r] == 1 for r in short)),
        )
        if direct:
            out.copy_(got)
        else:
            i, jj = valid.nonzero(as_tuple=True)
            out[rows[i], :, slots[i, jj]] = got[i, :, jj].to(out.dtype)
    for r in range(table.rows):
        n = table.q_len[r]
        if n <= SHORT_ROW:
            continue
        q_row = q[r, :, q_end[r] - n : q_end[r]]
        k_row = k[r, :, kv_start[r] : kv_start[r] + kv_lens[r]]
        v_row = v[r, :, kv_start[r] : kv_start[r] + kv_lens[r]]
        out[r, :, q_end[r] - n : q_end[r]] = attend_row_fused(
            q_row, k_row, v_row, causal=plan.causal, scale=scale
        )
    return out


def run_packed(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention of packed sequences: row r's queries and keys are the same tokens
    ``plan.table.q_start[r] :`` + ``q_len[r]`` of q ``[tokens, Hq, D]`` and k/v ``[tokens, Hkv,
    D]``. Each row runs on views of its tokens (ATen's fused flash kernel; one SDPA call with
    the band mask when the plan has a window), so nothing is padded or copied in. Returns
    ``out [tokens, Hq, Dv]``."""
    table = plan.table
    plan.check(table.q_len, table.kv_len)
    if out is None:
        out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    for r in range(table.rows):
        s, n = table.q_start[r], table.q_len[r]
        if n == 0:
            continue
        q_row, k_row, v_row = (t[s : s + n].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        if plan.window is None:
            got = flash_row(q_row, k_row, v_row, plan.causal, scale)[0]
        else:
            i = torch.arange(n, device=q.device)
            keep = i[None, :] > i[:, None] - plan.window
            if plan.causal:
                keep = keep & (i[None, :] <= i[:, None])
            got = F.scaled_dot_product_attention(
                q_row[None], k_row[None], v_row[None], attn_mask=keep, scale=scale,
                enable_gqa=q_row.shape[0] != k_row.shape[0],
            )[0]  # fmt: skip
        out[s : s + n] = got.transpose(0, 1)
    return out
