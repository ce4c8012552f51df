"""Launchers of the fused shared-head loss's Triton kernels (ce, kd, th_ce, th_kd; SPEC §3–4): the Triton sweep.

Three logit matrices can take part, none of them ever stored: the student head on the student embedding
(``l_s = head(z_s, W_s)``: ce, kd), the frozen teacher head on the student embedding (``l_th = head(z_st, W_t)``:
th_ce, th_kd) and the teacher logits (``l_t = head(z_t, W_t)``: the KD targets, no gradient). A head is
``s · ẑ Ŵᵀ`` (normalized rows) or ``z Wᵀ + b``. The margin touches one logit per row: the launcher computes the
target logit with its margin ``t_ce`` and derivative ``φ'`` per row (O(B·D), ``shared_head_math``), and the
kernels (``edgekd.kernels.shared_head_kernels``) substitute it at the target column. ``sweep_partials`` and
``sweep_backward`` are the sweep's entry points (``edgekd.kernels.sweeps``); the embedding-side normalization
backward (B×D) runs in PyTorch.
"""

from __future__ import annotations

import torch
import triton

from edgekd.errors import EdgekdError
from edgekd.kernels._launch import check_device, interpreting, next_pow2, num_splits, sweep_config
from edgekd.kernels.shared_head_kernels import shared_head_dw_kernel, shared_head_dz_kernel, shared_head_fwd_kernel
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
    shared_head_fwd_kernel[(n_bblk, n_split)](
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
        shared_head_dz_kernel[(n_bblk, n_split)](
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
            shared_head_dw_kernel[(triton.cdiv(C, cfg.block_c),)](
                e, p.W_s, p.n_s, p.b_s, t, dphi, et, p.W_t, p.n_t, p.b_t, p.labels, stats, grad, dW_s,
                db_s if p.has_bias_s else p.dummy,
                B, C, D, d_t, p.scale, 1.0 / T, float(T), 1.0 / B, HAS_BIAS=p.has_bias_s,
                DO_CE=bool(terms & TERM_CE), DO_KD=bool(terms & TERM_KD),
                BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_D=max(16, next_pow2(D)), BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
            )  # fmt: skip
    return outs[0], outs[1], dW_s, db_s
