"""The Triton kernels of the fused shared-head loss; their launchers are ``edgekd.kernels.shared_head``.

Kernels (fp32 accumulation for every input dtype, no locks, no ``(B, C)`` buffer):
- ``shared_head_fwd_kernel``, grid (row blocks, class splits): online log-sum-exp of every active matrix and
  the running ``Σ exp(a − max)(a − b)`` of KL(p_t ‖ p_x), written as per-split partials ``(n_split, N_PARTIALS, B)``
  that the launcher combines (O(B · splits)) into the chunked backend's layout (``shared_head_math``), so a
  class-sharded head merges them across ranks like the chunked sweep's.
- ``shared_head_dz_kernel``, grid (row blocks, class splits), once per head: recomputes logits tile by tile,
  forms ``d loss / d logits`` from the saved log-sum-exps and accumulates ``dẑ`` over full-D rows in
  registers, then adds it into a (B, D) fp32 buffer with atomics (one add per split).
- ``shared_head_dw_kernel``, grid (class blocks,), student head only: loops over all rows, accumulates
  ``dŴ`` (and ``db``) for its classes in registers and applies the row-normalization backward in-kernel.

The ``_``-prefixed jit functions are the kernels' shared pieces (tiles of logits, the online log-sum-exp, a logit's
gradient). Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors; bf16 tiles are then upcast to fp32 before any
arithmetic (the interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import triton
import triton.language as tl

from edgekd.heads.margin import NORM_EPS
from edgekd.kernels.shared_head_math import N_PARTIALS

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
def shared_head_fwd_kernel(
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
def shared_head_dz_kernel(
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
def shared_head_dw_kernel(
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
