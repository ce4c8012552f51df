"""Triton kernels and launchers for the fused shared-head loss (ce, kd, th_ce, th_kd; SPEC §3–4).

Three logit matrices can take part, none of them ever stored: the student head on the student embedding
(``l_s = head(z_s, W_s)``: ce, kd), the frozen teacher head on the student embedding (``l_th = head(z_st, W_t)``:
th_ce, th_kd) and the teacher logits (``l_t = head(z_t, W_t)``: the KD targets, no gradient). A head is
``s · ẑ Ŵᵀ`` (normalized rows) or ``z Wᵀ + b``. The margin touches one logit per row: the launcher computes the
target logit with its margin ``t_ce`` and derivative ``φ'`` per row (O(B·D), ``shared_head_math``), and the
kernels substitute it at the target column.

Kernels (fp32 accumulation for every input dtype, no locks, no ``(B, C)`` buffer):
- ``_shared_head_fwd_kernel``, grid (row blocks, class splits): online log-sum-exp of every active matrix and
  the running ``Σ exp(a − max)(a − b)`` of KL(p_t ‖ p_x), written as per-split partials ``(n_split, N_PARTIALS, B)``
  that the launcher combines (O(B · splits)) into the chunked backend's layout (``shared_head_math``), so a
  class-sharded head merges them across ranks like the chunked sweep's.
- ``_shared_head_dz_kernel``, grid (row blocks, class splits), once per head: recomputes logits tile by tile,
  forms ``d loss / d logits`` from the saved log-sum-exps and accumulates ``dẑ`` over full-D rows in
  registers, then adds it into a (B, D) fp32 buffer with atomics (one add per split).
- ``_shared_head_dw_kernel``, grid (class blocks,), student head only: loops over all rows, accumulates
  ``dŴ`` (and ``db``) for its classes in registers and applies the row-normalization backward in-kernel.

The embedding-side normalization backward (B×D) runs in PyTorch. Under ``TRITON_INTERPRET=1`` the kernels run on
CPU tensors; bf16 tiles are then upcast to fp32 before any arithmetic (the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from edgekd.errors import EdgekdError
from edgekd.heads.margin import NORM_EPS
from edgekd.kernels._launch import check_device, interpreting, next_pow2, num_splits, sweep_config
from edgekd.kernels.shared_head_math import (
    KIND_LINEAR,
    LSE_CE_S,
    LSE_CE_TH,
    LSE_KD_S,
    LSE_KD_TH,
    N_PARTIALS,
    NEED_W_S,
    NEED_Z_S,
    NEED_Z_ST,
    P_TGT_S,
    P_TGT_TH,
    TERM_CE,
    TERM_KD,
    TERM_TH_CE,
    TERM_TH_KD,
    combine_partials,
    merge_partials,
    normalize_backward,
    prepare_range_rows,
    row_norms,
)

# Globals read inside @triton.jit must be constexpr instances (an annotation is not enough once compiled).
_NORM_EPS = tl.constexpr(NORM_EPS)
_N_STATS = tl.constexpr(5)
_N_PARTIALS = tl.constexpr(N_PARTIALS)


@triton.jit
def _finish_logits(acc, n_ptr, b_ptr, cols, col_ok, scale, NORMALIZED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``s · acc / max(‖w_j‖, eps)`` for normalized heads, ``acc + b_j`` for linear ones; acc: [BLOCK_B, BLOCK_C]."""
    if NORMALIZED:
        nrm = tl.load(n_ptr + cols, mask=col_ok, other=1.0)  # [BLOCK_C]
        acc = acc * (scale / tl.maximum(nrm, _NORM_EPS))[None, :]
    elif HAS_BIAS:
        acc = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tile_logits(
    e_ptr,  # [B, D] embedding (normalized for cosine heads)
    w_ptr,  # [C, D] class matrix
    n_ptr,  # [C] fp32 row norms of w (normalized heads)
    b_ptr,  # [C] bias (linear heads)
    rows, cols, row_ok, col_ok, D, scale,
    NORMALIZED: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 logits [BLOCK_B, BLOCK_C] of a row block against a class block, reducing D in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        e = tl.load(e_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            e = e.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(e, tl.trans(w), acc, input_precision=PRECISION)
    return _finish_logits(acc, n_ptr, b_ptr, cols, col_ok, scale, NORMALIZED, HAS_BIAS)


@triton.jit
def _online_lse(m, s, x):
    """Fold x [BLOCK_B, BLOCK_C] (masked entries −inf) into the running max m and sum s, both [BLOCK_B]."""
    m_new = tl.maximum(m, tl.max(x, 1))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
    return m_new, s


@triton.jit
def _shared_head_fwd_kernel(
    es_ptr, ws_ptr, ns_ptr, bs_ptr, ts_ptr,  # student head: ê_s [B, D_s], W_s [C, D_s], ‖W_s‖ [C], b_s [C], t_ce [B]
    eh_ptr, wt_ptr, nt_ptr, bt_ptr, th_ptr,  # teacher head on z_st: ê_st [B, D_t], W_t [C, D_t], ‖W_t‖ [C], b_t, t_ce
    et_ptr,  # [B, D_t] teacher embedding ê_t
    labels_ptr,  # [B] int64
    part_ptr,  # [n_split, N_PARTIALS, B] fp32 partial statistics (output: rows 0-11, see shared_head_math)
    B, C, D_s, D_t, scale, inv_T, blocks_per_split,
    NORMALIZED: tl.constexpr, HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    DO_CE: tl.constexpr, DO_KD: tl.constexpr, DO_TH_CE: tl.constexpr, DO_TH_KD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    t_s = tl.zeros((BLOCK_B,), tl.float32)
    t_h = tl.zeros((BLOCK_B,), tl.float32)
    if DO_CE:
        t_s = tl.load(ts_ptr + rows, mask=row_ok, other=0.0)
    if DO_TH_CE:
        t_h = tl.load(th_ptr + rows, mask=row_ok, other=0.0)
    neg = float("-inf")
    m_ce_s = tl.full((BLOCK_B,), neg, tl.float32)
    m_kd_s = tl.full((BLOCK_B,), neg, tl.float32)
    m_t = tl.full((BLOCK_B,), neg, tl.float32)
    m_ce_h = tl.full((BLOCK_B,), neg, tl.float32)
    m_kd_h = tl.full((BLOCK_B,), neg, tl.float32)
    s_ce_s = tl.zeros((BLOCK_B,), tl.float32)
    s_kd_s = tl.zeros((BLOCK_B,), tl.float32)
    s_t = tl.zeros((BLOCK_B,), tl.float32)
    s_ce_h = tl.zeros((BLOCK_B,), tl.float32)
    s_kd_h = tl.zeros((BLOCK_B,), tl.float32)
    k_s = tl.zeros((BLOCK_B,), tl.float32)  # Σ exp(a − m_t)(a − l_s/T)
    k_h = tl.zeros((BLOCK_B,), tl.float32)  # Σ exp(a − m_t)(a − l_th/T)

    n_cblk = tl.cdiv(C, BLOCK_C)
    cb_start = pid_s * blocks_per_split
    cb_end = tl.minimum(cb_start + blocks_per_split, n_cblk)
    for cb in range(cb_start, cb_end):
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < C
        is_t = cols[None, :] == labels[:, None]
        if DO_KD or DO_TH_KD:
            a = _tile_logits(et_ptr, wt_ptr, nt_ptr, bt_ptr, rows, cols, row_ok, col_ok, D_t, scale, NORMALIZED,
                             HAS_BIAS_T, UPCAST, PRECISION, BLOCK_B, BLOCK_C, BLOCK_K)  # fmt: skip
            a = tl.where(col_ok[None, :], a * inv_T, neg)
            m_new = tl.maximum(m_t, tl.max(a, 1))
            alpha = tl.exp(m_t - m_new)
            p_t = tl.exp(a - m_new[:, None])  # [BLOCK_B, BLOCK_C], 0 at masked columns
            s_t = s_t * alpha + tl.sum(p_t, 1)
            k_s = k_s * alpha
            k_h = k_h * alpha
            m_t = m_new
        if DO_CE or DO_KD:
            l_s = _tile_logits(es_ptr, ws_ptr, ns_ptr, bs_ptr, rows, cols, row_ok, col_ok, D_s, scale, NORMALIZED,
                               HAS_BIAS_S, UPCAST, PRECISION, BLOCK_B, BLOCK_C, BLOCK_K)  # fmt: skip
            if DO_CE:
                x = tl.where(col_ok[None, :], tl.where(is_t, t_s[:, None], l_s), neg)
                m_ce_s, s_ce_s = _online_lse(m_ce_s, s_ce_s, x)
            if DO_KD:
                b = l_s * inv_T
                m_kd_s, s_kd_s = _online_lse(m_kd_s, s_kd_s, tl.where(col_ok[None, :], b, neg))
                k_s += tl.sum(p_t * tl.where(col_ok[None, :], a - b, 0.0), 1)
        if DO_TH_CE or DO_TH_KD:
            l_h = _tile_logits(eh_ptr, wt_ptr, nt_ptr, bt_ptr, rows, cols, row_ok, col_ok, D_t, scale, NORMALIZED,
                               HAS_BIAS_T, UPCAST, PRECISION, BLOCK_B, BLOCK_C, BLOCK_K)  # fmt: skip
            if DO_TH_CE:
                x = tl.where(col_ok[None, :], tl.where(is_t, t_h[:, None], l_h), neg)
                m_ce_h, s_ce_h = _online_lse(m_ce_h, s_ce_h, x)
            if DO_TH_KD:
                b = l_h * inv_T
                m_kd_h, s_kd_h = _online_lse(m_kd_h, s_kd_h, tl.where(col_ok[None, :], b, neg))
                k_h += tl.sum(p_t * tl.where(col_ok[None, :], a - b, 0.0), 1)

    out = part_ptr + pid_s * _N_PARTIALS * B + rows
    tl.store(out + 0 * B, m_ce_s, mask=row_ok)
    tl.store(out + 1 * B, s_ce_s, mask=row_ok)
    tl.store(out + 2 * B, m_kd_s, mask=row_ok)
    tl.store(out + 3 * B, s_kd_s, mask=row_ok)
    tl.store(out + 4 * B, m_t, mask=row_ok)
    tl.store(out + 5 * B, s_t, mask=row_ok)
    tl.store(out + 6 * B, k_s, mask=row_ok)
    tl.store(out + 7 * B, k_h, mask=row_ok)
    tl.store(out + 8 * B, m_ce_h, mask=row_ok)
    tl.store(out + 9 * B, s_ce_h, mask=row_ok)
    tl.store(out + 10 * B, m_kd_h, mask=row_ok)
    tl.store(out + 11 * B, s_kd_h, mask=row_ok)


@triton.jit
def _logit_grad(
    l, is_t, a,  # [BLOCK_B, BLOCK_C] own logits, target mask, teacher logits / T (unused without KD)
    t, dphi, lse_ce, lse_kd, lse_t,  # [BLOCK_B] per-row target logit, margin derivative and log-sum-exps
    coef_ce, coef_kd, inv_T,  # g_ce / B, g_kd · T / B
    DO_CE: tl.constexpr, DO_KD: tl.constexpr,
):  # fmt: skip
    """``d loss / d logits`` [BLOCK_B, BLOCK_C], with the CE part at the target column chained through φ'."""
    g = tl.zeros_like(l)
    if DO_CE:
        p = tl.exp(tl.where(is_t, t[:, None], l) - lse_ce[:, None])
        d = (p - is_t.to(tl.float32)) * coef_ce
        g = tl.where(is_t, d * dphi[:, None], d)
    if DO_KD:
        g += (tl.exp(l * inv_T - lse_kd[:, None]) - tl.exp(a - lse_t[:, None])) * coef_kd
    return g


@triton.jit
def _shared_head_dz_kernel(
    e_ptr, w_ptr, n_ptr, b_ptr, t_ptr, dphi_ptr,  # head: ê [B, D], W [C, D], ‖W‖ [C], b [C], t_ce [B], φ' [B]
    et_ptr, wt_ptr, ntt_ptr, btt_ptr,  # teacher: ê_t [B, D_t], W_t [C, D_t], ‖W_t‖ [C], b_t [C]
    labels_ptr,  # [B] int64
    stats_ptr,  # [B, 5] fp32 log-sum-exps
    grad_ptr,  # [4] fp32 upstream gradient of (ce, kd, th_ce, th_kd)
    de_ptr,  # [B, D] fp32 gradient wrt ê (output, accumulated with atomics over splits)
    B, C, D, D_t, scale, inv_T, T, inv_B, blocks_per_split,
    COL_CE: tl.constexpr, COL_KD: tl.constexpr, G_CE: tl.constexpr, G_KD: tl.constexpr,
    NORMALIZED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    DO_CE: tl.constexpr, DO_KD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    e = tl.load(e_ptr + rows[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        e = e.to(tl.float32)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    t = tl.zeros((BLOCK_B,), tl.float32)
    dphi = tl.zeros((BLOCK_B,), tl.float32)
    if DO_CE:
        t = tl.load(t_ptr + rows, mask=row_ok, other=0.0)
        dphi = tl.load(dphi_ptr + rows, mask=row_ok, other=0.0)
    lse_ce = tl.load(stats_ptr + rows * _N_STATS + COL_CE, mask=row_ok, other=0.0)
    lse_kd = tl.load(stats_ptr + rows * _N_STATS + COL_KD, mask=row_ok, other=0.0)
    lse_t = tl.load(stats_ptr + rows * _N_STATS + 2, mask=row_ok, other=0.0)
    coef_ce = tl.load(grad_ptr + G_CE) * inv_B
    coef_kd = tl.load(grad_ptr + G_KD) * T * inv_B

    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    n_cblk = tl.cdiv(C, BLOCK_C)
    cb_start = pid_s * blocks_per_split
    cb_end = tl.minimum(cb_start + blocks_per_split, n_cblk)
    for cb in range(cb_start, cb_end):
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        col_ok = cols < C
        is_t = cols[None, :] == labels[:, None]
        w = tl.load(w_ptr + cols[:, None] * D + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        l = tl.dot(e, tl.trans(w), input_precision=PRECISION)
        l = _finish_logits(l, n_ptr, b_ptr, cols, col_ok, scale, NORMALIZED, HAS_BIAS)
        a = l
        if DO_KD:
            a = _tile_logits(et_ptr, wt_ptr, ntt_ptr, btt_ptr, rows, cols, row_ok, col_ok, D_t, scale, NORMALIZED,
                             HAS_BIAS_T, UPCAST, PRECISION, BLOCK_B, BLOCK_C, BLOCK_K) * inv_T  # fmt: skip
        g = _logit_grad(l, is_t, a, t, dphi, lse_ce, lse_kd, lse_t, coef_ce, coef_kd, inv_T, DO_CE, DO_KD)
        if NORMALIZED:  # d/dê of s·ê·w_j/‖w_j‖
            nrm = tl.load(n_ptr + cols, mask=col_ok, other=1.0)
            g = g * (scale / tl.maximum(nrm, _NORM_EPS))[None, :]
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        acc = tl.dot(g.to(w.dtype), w, acc, input_precision=PRECISION)
    tl.atomic_add(de_ptr + rows[:, None] * D + ds[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _shared_head_dw_kernel(
    e_ptr, w_ptr, n_ptr, b_ptr, t_ptr, dphi_ptr,  # student head: ê_s [B, D], W_s [C, D], ‖W_s‖ [C], b_s, t_ce, φ'
    et_ptr, wt_ptr, ntt_ptr, btt_ptr,  # teacher: ê_t [B, D_t], W_t [C, D_t], ‖W_t‖ [C], b_t [C]
    labels_ptr,  # [B] int64
    stats_ptr,  # [B, 5] fp32 log-sum-exps
    grad_ptr,  # [4] fp32 upstream gradient of (ce, kd, th_ce, th_kd)
    dw_ptr,  # [C, D] gradient wrt W_s (output, W_s dtype)
    db_ptr,  # [C] gradient wrt b_s (output; linear heads with bias)
    B, C, D, D_t, scale, inv_T, T, inv_B,
    NORMALIZED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_T: tl.constexpr,
    DO_CE: tl.constexpr, DO_KD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    col_ok = cols < C
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    w = tl.load(w_ptr + cols[:, None] * D + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    coef_ce = tl.load(grad_ptr + 0) * inv_B
    coef_kd = tl.load(grad_ptr + 1) * T * inv_B

    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for rb in range(0, tl.cdiv(B, BLOCK_B)):
        rows = rb * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        row_ok = rows < B
        e = tl.load(e_ptr + rows[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            e = e.to(tl.float32)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        t = tl.zeros((BLOCK_B,), tl.float32)
        dphi = tl.zeros((BLOCK_B,), tl.float32)
        if DO_CE:
            t = tl.load(t_ptr + rows, mask=row_ok, other=0.0)
            dphi = tl.load(dphi_ptr + rows, mask=row_ok, other=0.0)
        lse_ce = tl.load(stats_ptr + rows * _N_STATS + 0, mask=row_ok, other=0.0)
        lse_kd = tl.load(stats_ptr + rows * _N_STATS + 1, mask=row_ok, other=0.0)
        lse_t = tl.load(stats_ptr + rows * _N_STATS + 2, mask=row_ok, other=0.0)
        is_t = cols[None, :] == labels[:, None]
        l = tl.dot(e, tl.trans(w), input_precision=PRECISION)
        l = _finish_logits(l, n_ptr, b_ptr, cols, col_ok, scale, NORMALIZED, HAS_BIAS)
        a = l
        if DO_KD:
            a = _tile_logits(et_ptr, wt_ptr, ntt_ptr, btt_ptr, rows, cols, row_ok, col_ok, D_t, scale, NORMALIZED,
                             HAS_BIAS_T, UPCAST, PRECISION, BLOCK_B, BLOCK_C, BLOCK_K) * inv_T  # fmt: skip
        g = _logit_grad(l, is_t, a, t, dphi, lse_ce, lse_kd, lse_t, coef_ce, coef_kd, inv_T, DO_CE, DO_KD)
        if NORMALIZED:
            g = g * scale
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        acc = tl.dot(tl.trans(g).to(e.dtype), e, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc_b += tl.sum(g, 0)

    if NORMALIZED:  # backward of ŵ = w / max(‖w‖, eps), row by row
        nrm = tl.load(n_ptr + cols, mask=col_ok, other=1.0)
        inv = 1.0 / tl.maximum(nrm, _NORM_EPS)
        w_hat = w.to(tl.float32) * inv[:, None]
        proj = acc - tl.sum(acc * w_hat, 1)[:, None] * w_hat
        acc = tl.where((nrm >= _NORM_EPS)[:, None], proj, acc) * inv[:, None]
    out_ok = col_ok[:, None] & d_ok[None, :]
    tl.store(dw_ptr + cols[:, None] * D + ds[None, :], acc.to(dw_ptr.dtype.element_ty), mask=out_ok)
    if HAS_BIAS:
        tl.store(db_ptr + cols, acc_b.to(db_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------
# Launchers


class _Prepared:
    """Contiguous inputs, per-row targets and per-class norms for one call (forward or backward)."""

    def __init__(self, z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, terms):
        check_device(z_s)
        for name, x in (("z_s", z_s), ("W_s", W_s), ("z_st", z_st), ("W_t", W_t), ("z_t", z_t)):
            if x is not None and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise EdgekdError(f"the triton loss backend takes float32/float16/bfloat16; {name} is {x.dtype}")
        acc = torch.float32
        self.normalized = kind != KIND_LINEAR
        if self.normalized:
            b_s = b_t = None
        self.terms, self.B = terms, z_s.shape[0]
        self.C = (W_s if W_s is not None else W_t).shape[0]
        self.scale = float(s) if self.normalized else 1.0
        self.labels = labels.contiguous()
        dummy = torch.zeros(1, dtype=acc, device=z_s.device)
        self.dummy = dummy
        self.W_s = self.W_t = self.b_s = self.b_t = dummy
        self.n_s = self.n_t = dummy
        self.rows_s = self.rows_h = self.rows_t = None
        self.has_bias_s, self.has_bias_t = b_s is not None, b_t is not None
        if terms & (TERM_CE | TERM_KD):
            self.W_s = W_s.contiguous()
            self.b_s = b_s.contiguous() if b_s is not None else dummy
            self.n_s = row_norms(self.W_s) if self.normalized else dummy
            self.rows_s = prepare_range_rows(z_s, self.W_s, b_s, self.labels, kind, s, m, self.W_s.dtype, acc)
        if terms & (TERM_KD | TERM_TH_CE | TERM_TH_KD):
            self.W_t = W_t.contiguous()
            self.b_t = b_t.contiguous() if b_t is not None else dummy
            self.n_t = row_norms(self.W_t) if self.normalized else dummy
        if terms & (TERM_TH_CE | TERM_TH_KD):
            self.rows_h = prepare_range_rows(z_st, self.W_t, b_t, self.labels, kind, s, m, self.W_t.dtype, acc)
        if terms & (TERM_KD | TERM_TH_KD):
            self.rows_t = prepare_range_rows(z_t.detach(), self.W_t, b_t, None, kind, s, m, self.W_t.dtype, acc)
        dtypes = {W.dtype for W in (self.W_s, self.W_t) if W is not dummy}
        # The interpreter computes bf16 arithmetic wrongly: upcast tiles to fp32 there. TF32 follows torch's setting.
        self.upcast = interpreting() and torch.bfloat16 in dtypes
        tf32 = dtypes == {torch.float32} and torch.get_float32_matmul_precision() != "highest" and not interpreting()
        self.precision = "tf32" if tf32 else "ieee"

    def rows(self, which):
        """(ê, t_ce, φ') pointers of a head's prepared rows, dummies where absent."""
        r = {"s": self.rows_s, "h": self.rows_h, "t": self.rows_t}[which]
        if r is None:
            return self.dummy, self.dummy, self.dummy
        e = r.e.contiguous()
        return e, (r.t_ce if r.t_ce is not None else self.dummy), (r.dphi if r.dphi is not None else self.dummy)


def sweep_partials(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c) -> torch.Tensor:
    """Per-row partials ``(N_PARTIALS, B)`` fp32 of the classes of ``W_s``/``W_t``: the whole head or one shard.

    Arguments as ``edgekd::shared_head_triton``; ``labels`` index the rows of the given matrices and may fall outside
    them (a class shard: those rows have no target here, and no column matches them in the kernels). The kernel's
    class splits are combined here, so the result has the chunked backend's layout and merges with other ranges'
    (``merge_partials``).
    """
    p = _Prepared(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, terms)
    B, C = p.B, p.C
    dtype = (W_s if terms & (TERM_CE | TERM_KD) else W_t).dtype
    d_s = W_s.shape[1] if W_s is not None else 1
    d_t = W_t.shape[1] if W_t is not None else 1
    cfg = sweep_config("fwd", max(d_s, d_t), dtype, z_s.device, block_c)
    n_bblk, n_cblk = triton.cdiv(B, cfg.block_b), triton.cdiv(C, cfg.block_c)
    n_split, per_split = num_splits(n_bblk, n_cblk, cfg.target_programs)
    part = torch.zeros(n_split, N_PARTIALS, B, dtype=torch.float32, device=z_s.device)
    es, ts, _ = p.rows("s")
    eh, th, _ = p.rows("h")
    et, _, _ = p.rows("t")
    _shared_head_fwd_kernel[(n_bblk, n_split)](
        es, p.W_s, p.n_s, p.b_s, ts, eh, p.W_t, p.n_t, p.b_t, th, et, p.labels, part,
        B, C, d_s, d_t, p.scale, 1.0 / T, per_split,
        NORMALIZED=p.normalized, HAS_BIAS_S=p.has_bias_s, HAS_BIAS_T=p.has_bias_t,
        DO_CE=bool(terms & TERM_CE), DO_KD=bool(terms & TERM_KD),
        DO_TH_CE=bool(terms & TERM_TH_CE), DO_TH_KD=bool(terms & TERM_TH_KD),
        UPCAST=p.upcast, PRECISION=p.precision,
        BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    # The target logits (with margin) are per-row values, not sums over classes: split 0 carries them.
    for row, rows in ((P_TGT_S, p.rows_s), (P_TGT_TH, p.rows_h)):
        if rows is not None and rows.t_ce is not None:
            part[0, row] = rows.t_ce
    return combine_partials(part, terms)


def shared_head_fwd(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c):
    """Forward of ``edgekd::shared_head_triton``: ``(losses (4,), stats (B, 5))`` fp32; see the module docstring."""
    part = sweep_partials(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c)
    return merge_partials(part[None], terms, T)


def sweep_backward(grad, stats, z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c, need):
    """Backward of ``edgekd::shared_head_triton``: ``(dz_s, dz_st, dW_s, db_s)``, empty where not needed.

    ``stats`` may be those of a larger head than ``W_s``/``W_t`` (``merge_partials`` over class shards, labels local to
    this one): the result is then this range's share, ``dW_s``/``db_s`` complete and ``dz`` its part of the sum.
    """
    p = _Prepared(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, terms)
    B, C, device = p.B, p.C, z_s.device
    grad = grad.to(torch.float32).contiguous()
    stats = stats.contiguous()
    d_t = W_t.shape[1] if W_t is not None else 1
    et, _, _ = p.rows("t")
    common = dict(UPCAST=p.upcast, PRECISION=p.precision, NORMALIZED=p.normalized, HAS_BIAS_T=p.has_bias_t)
    outs = []
    heads = (
        ("s", z_s, NEED_Z_S, p.W_s, p.n_s, p.b_s, p.has_bias_s, TERM_CE, TERM_KD, LSE_CE_S, LSE_KD_S, 0, 1),
        ("h", z_st, NEED_Z_ST, p.W_t, p.n_t, p.b_t, p.has_bias_t, TERM_TH_CE, TERM_TH_KD, LSE_CE_TH, LSE_KD_TH, 2, 3),
    )
    for which, z, bit, W, n, b, has_bias, ce_bit, kd_bit, col_ce, col_kd, g_ce, g_kd in heads:
        rows = p.rows_s if which == "s" else p.rows_h
        if not need & bit:
            outs.append(torch.empty(0, device=device))
            continue
        if rows is None:
            outs.append(torch.zeros_like(z))
            continue
        D = W.shape[1]
        cfg = sweep_config("dz", D, W.dtype, device, block_c)
        n_bblk, n_cblk = triton.cdiv(B, cfg.block_b), triton.cdiv(C, cfg.block_c)
        n_split, per_split = num_splits(n_bblk, n_cblk, cfg.target_programs)
        de = torch.zeros(B, D, dtype=torch.float32, device=device)
        e, t, dphi = p.rows(which)
        _shared_head_dz_kernel[(n_bblk, n_split)](
            e, W, n, b, t, dphi, et, p.W_t, p.n_t, p.b_t, p.labels, stats, grad, de,
            B, C, D, d_t, p.scale, 1.0 / T, float(T), 1.0 / B, per_split,
            COL_CE=col_ce, COL_KD=col_kd, G_CE=g_ce, G_KD=g_kd, HAS_BIAS=has_bias,
            DO_CE=bool(terms & ce_bit), DO_KD=bool(terms & kd_bit),
            BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=max(16, next_pow2(D)), BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
        )  # fmt: skip
        if p.normalized:
            de = normalize_backward(de, rows.e.float(), rows.e_norms)
        outs.append(de.to(z.dtype))

    dW_s, db_s = torch.empty(0, device=device), torch.empty(0, device=device)
    if need & NEED_W_S and W_s is not None:
        dW_s = torch.empty_like(W_s, memory_format=torch.contiguous_format)
        db_s = torch.zeros_like(b_s) if b_s is not None else db_s
        if p.rows_s is None:
            dW_s.zero_()
        else:
            D = W_s.shape[1]
            cfg = sweep_config("dw", D, W_s.dtype, device, block_c)
            e, t, dphi = p.rows("s")
            _shared_head_dw_kernel[(triton.cdiv(C, cfg.block_c),)](
                e, p.W_s, p.n_s, p.b_s, t, dphi, et, p.W_t, p.n_t, p.b_t, p.labels, stats, grad, dW_s,
                db_s if p.has_bias_s else p.dummy,
                B, C, D, d_t, p.scale, 1.0 / T, float(T), 1.0 / B, HAS_BIAS=p.has_bias_s,
                DO_CE=bool(terms & TERM_CE), DO_KD=bool(terms & TERM_KD),
                BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=max(16, next_pow2(D)), BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
            )  # fmt: skip
    return outs[0], outs[1], dW_s, db_s
