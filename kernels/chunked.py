"""The ``chunked`` loss backend: pure PyTorch, sweeps the classes in blocks, never holds a ``(B, C)`` matrix.

Forward: one sweep over class blocks keeps, per row, an online log-sum-exp of every logit matrix it needs
(student CE logits with margin, student logits / T, teacher logits / T, teacher-head CE and KD logits) and the
running ``Σ_j exp(a_j − max)(a_j − b_j)`` that gives KL(p_t ‖ p_x) at the end. Backward: a second sweep
recomputes each block's logits, forms ``d loss / d logits`` from the saved log-sum-exps, and accumulates
``dz`` and writes ``dW``/``db`` block by block. Memory is O(B·block_c + C·D); accumulation is float32 (float64
for float64 inputs). The PyTorch fallback of the Triton kernels (any device): the ``edgekd::shared_head_chunked``
custom op, and ``shared_head_loss_chunked``, which ``edgekd.losses`` registers as the ``chunked`` backend.

The forward is two steps so that a class-sharded head (``edgekd.distributed``) runs the same math: ``sweep_partials``
returns raw per-row partials of one class range, ``merge_partials`` (``shared_head_math``, shared with the Triton
backend) merges the partials of disjoint ranges (one range here, one per rank there). ``sweep_backward`` takes the
merged statistics, so it works on any one range.
"""

from __future__ import annotations

import math

import torch

from edgekd.kernels.shared_head_autograd import define_shared_head_op, empty_grad, make_loss_backend
from edgekd.kernels.shared_head_math import (
    KIND_LINEAR,
    LSE_CE_S,
    LSE_CE_TH,
    LSE_KD_S,
    LSE_KD_TH,
    LSE_T,
    N_PARTIALS,
    NEED_W_S,
    NEED_Z_S,
    NEED_Z_ST,
    P_CE_S,
    P_CE_TH,
    P_K_S,
    P_K_TH,
    P_KD_S,
    P_KD_TH,
    P_T,
    P_TGT_S,
    P_TGT_TH,
    TERM_CE,
    TERM_KD,
    TERM_TH_CE,
    TERM_TH_KD,
    HeadRows,
    accum_dtype,
    inv_clamped,
    merge_partials,
    normalize_backward,
    prepare_range_rows,
    row_norms,
)

# Elements of one (B, block) fp32 block: 2^20 (4 MiB) keeps a handful of live blocks in tens of MiB.
BLOCK_ELEMENTS = 1 << 20


def default_block_c(B: int, C: int) -> int:
    """Classes per block: ``BLOCK_ELEMENTS / B`` rounded down to a multiple of 128, at least 128, at most C."""
    return max(1, min(C, max(128, (BLOCK_ELEMENTS // max(B, 1)) // 128 * 128)))


class _Sweep:
    """A head ``W: (C, D)`` (+ ``b: (C,)``) applied to prepared rows, one class block at a time."""

    def __init__(self, rows: HeadRows, W: torch.Tensor, b: torch.Tensor | None, kind: int, s: float, acc):
        self.rows, self.W, self.b, self.acc = rows, W, b, acc
        self.normalized = kind != KIND_LINEAR
        self.scale = s if self.normalized else 1.0

    def block(self, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, c1 − c0)`` of the block (a fresh tensor the caller may overwrite), its (normalized)
        weights ``(c1 − c0, D)`` and their raw norms ``(c1 − c0,)``."""
        w = self.W[c0:c1].to(self.acc)
        if not self.normalized:
            if self.b is None:
                return self.rows.e @ w.T, w, None
            return torch.addmm(self.b[c0:c1].to(self.acc), self.rows.e, w.T), w, None
        norms = row_norms(w, self.acc)
        w = w * inv_clamped(norms)[:, None]
        return torch.mm(self.rows.e, w.T).mul_(self.scale), w, norms


class _Targets:
    """Where each row's label falls in a class block, for O(B) edits of the target column (no (B, n) mask)."""

    def __init__(self, labels: torch.Tensor, c0: int, c1: int):
        self.hit = (labels >= c0) & (labels < c1)  # (B,)
        self.idx = (labels - c0).clamp(0, c1 - c0 - 1)[:, None]  # (B, 1)

    def put(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """In place: ``x[i, label_i] = values[i]`` for the rows whose label is in the block."""
        return x.scatter_(1, self.idx, torch.where(self.hit, values, x.gather(1, self.idx)[:, 0])[:, None])

    def scale(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """In place: ``x[i, label_i] *= factors[i]`` for the rows whose label is in the block."""
        return self.put(x, x.gather(1, self.idx)[:, 0] * torch.where(self.hit, factors, torch.ones_like(factors)))

    def subtract_one(self, x: torch.Tensor) -> torch.Tensor:
        """In place: ``x − onehot(labels)`` restricted to the block."""
        return x.scatter_add_(1, self.idx, -self.hit.to(x.dtype)[:, None])


class _OnlineLSE:
    """Running ``(max, Σ exp(x − max))`` per row over class blocks."""

    def __init__(self, B: int, like: torch.Tensor):
        self.m = torch.full((B,), -math.inf, dtype=like.dtype, device=like.device)
        self.s = torch.zeros(B, dtype=like.dtype, device=like.device)
        self.alpha = None

    def update(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Fold the block ``x: (B, n)`` in and return ``exp(x − new max)`` (overwriting x when ``inplace``);
        ``self.alpha`` is the factor that rescaled the old sum."""
        m_new = torch.maximum(self.m, x.max(1).values)
        self.alpha = torch.exp(self.m - m_new)
        e = x.sub_(m_new[:, None]).exp_() if inplace else torch.exp(x - m_new[:, None])
        self.s = self.s * self.alpha + e.sum(1)
        self.m = m_new
        return e

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)


def _setup(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, terms):
    """The sweeps a call needs: student head, teacher head on the student, teacher; None where unused."""
    acc = accum_dtype(z_s.dtype)
    if kind != KIND_LINEAR:
        b_s = b_t = None  # normalized heads have no bias (heads.margin.plain_logits)
    student = th = teacher = None

    def rows(z, W, b, y):  # labels may fall outside W's classes: a class shard's, local to it
        return prepare_range_rows(z, W, b, y, kind, s, m, acc, acc)

    if terms & (TERM_CE | TERM_KD):
        student = _Sweep(rows(z_s, W_s, b_s, labels), W_s, b_s, kind, s, acc)
    if terms & (TERM_TH_CE | TERM_TH_KD):
        th = _Sweep(rows(z_st, W_t, b_t, labels), W_t, b_t, kind, s, acc)
    if terms & (TERM_KD | TERM_TH_KD):
        teacher = _Sweep(rows(z_t.detach(), W_t, b_t, None), W_t, b_t, kind, s, acc)
    C = (W_s if W_s is not None else W_t).shape[0]
    return acc, C, student, th, teacher


def sweep_partials(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c) -> torch.Tensor:
    """Raw per-row partials ``(N_PARTIALS, B)`` of the classes of ``W_s``/``W_t``: the whole head or one shard.

    Arguments as the ``edgekd::shared_head_chunked`` op; ``labels`` index the rows of the given matrices and may
    fall outside them (a shard: those rows have no target here). ``merge_partials`` turns partials of disjoint class
    ranges into the losses and per-row statistics of their union.
    """
    acc, C, student, th, teacher = _setup(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, terms)
    B = z_s.shape[0]
    block = block_c if block_c > 0 else default_block_c(B, C)
    like = torch.empty(0, dtype=acc, device=z_s.device)
    lse = {k: _OnlineLSE(B, like) for k in ("ce_s", "kd_s", "t", "ce_th", "kd_th")}
    k_sum = {"s": torch.zeros(B, dtype=acc, device=z_s.device), "th": torch.zeros(B, dtype=acc, device=z_s.device)}
    for c0 in range(0, C, block):
        c1 = min(C, c0 + block)
        targets = _Targets(labels, c0, c1)
        p_t = a = None
        if teacher is not None:
            a = teacher.block(c0, c1)[0].div_(T)
            p_t = lse["t"].update(a)  # exp(a − running max)
            for key in k_sum:
                k_sum[key] = k_sum[key] * lse["t"].alpha
        for sweep, name, ce_bit, kd_bit in ((student, "s", TERM_CE, TERM_KD), (th, "th", TERM_TH_CE, TERM_TH_KD)):
            if sweep is None:
                continue
            logits = sweep.block(c0, c1)[0]
            if terms & kd_bit:
                b_over_T = logits / T
                lse[f"kd_{name}"].update(b_over_T)
                k_sum[name] = k_sum[name] + b_over_T.neg_().add_(a).mul_(p_t).sum(1)  # Σ p̃_t (a − b)
            if terms & ce_bit:
                lse[f"ce_{name}"].update(targets.put(logits, sweep.rows.t_ce), inplace=True)

    part = torch.zeros(N_PARTIALS, B, dtype=acc, device=z_s.device)
    for row, key in ((P_CE_S, "ce_s"), (P_KD_S, "kd_s"), (P_T, "t"), (P_CE_TH, "ce_th"), (P_KD_TH, "kd_th")):
        part[row], part[row + 1] = lse[key].m, lse[key].s
    part[P_K_S], part[P_K_TH] = k_sum["s"], k_sum["th"]
    for row, sweep in ((P_TGT_S, student), (P_TGT_TH, th)):
        if sweep is not None:
            part[row] = sweep.rows.t_ce
    return part


def _chunked_forward(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c):
    part = sweep_partials(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c)
    return merge_partials(part[None], terms, T)


def _head_grad(sweep, logits, targets, p_t, stats, grad, ce_col, kd_col, g_ce, g_kd, T, B):
    """``d loss / d cos`` (normalized heads) or ``d loss / d logits`` (linear) of one block, (B, n).

    Overwrites ``logits``. The CE part at the target column is chained through the margin's derivative.
    """
    g = None
    if g_kd is not None:  # T²/B · d KL / d l = T/B · (p_x − p_t)
        g = (logits / T).sub_(stats[:, kd_col, None]).exp_().sub_(p_t).mul_(grad[g_kd] * T / B)
    if g_ce is not None:  # (softmax − onehot)/B, target entry times φ'
        p = targets.put(logits, sweep.rows.t_ce).sub_(stats[:, ce_col, None]).exp_()
        p = targets.scale(targets.subtract_one(p).mul_(grad[g_ce] / B), sweep.rows.dphi)
        g = p if g is None else g.add_(p)
    return g.mul_(sweep.scale) if sweep.scale != 1.0 else g


def sweep_backward(grad, stats, z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, T, terms, block_c, need):
    """``(dz_s, dz_st, dW_s, db_s)`` of the classes of ``W_s``/``W_t`` given the merged per-row ``stats``.

    Arguments as the ``edgekd::shared_head_chunked_bwd`` op. Every gradient of a logit needs only its row's global
    log-sum-exps, so with the stats of a union of class ranges (``merge_partials``) and labels local to one range
    this is that range's share: ``dW_s``/``db_s`` of its classes complete, ``dz`` its contribution to the sum over
    ranges. Losses are means over the ``B`` rows given here.
    """
    acc, C, student, th, teacher = _setup(z_s, labels, W_s, b_s, z_st, W_t, b_t, z_t, kind, s, m, terms)
    B = z_s.shape[0]
    block = block_c if block_c > 0 else default_block_c(B, C)
    grad = grad.to(acc)
    dz_s = empty_grad(z_s, bool(need & NEED_Z_S), z_s.device)
    dz_st = empty_grad(z_st, bool(need & NEED_Z_ST), z_s.device)
    dW_s = empty_grad(W_s, bool(need & NEED_W_S), z_s.device)
    db_s = empty_grad(b_s, bool(need & NEED_W_S), z_s.device)
    want_w = student is not None and dW_s.numel() > 0
    want_b = want_w and not student.normalized and db_s.numel() > 0
    de = {
        "s": torch.zeros_like(student.rows.e) if student is not None and dz_s.numel() else None,
        "th": torch.zeros_like(th.rows.e) if th is not None and dz_st.numel() else None,
    }
    # Gradients of inputs no active term reads are zero (normalized heads ignore the bias).
    for out, filled in ((dz_s, de["s"] is not None), (dz_st, de["th"] is not None), (dW_s, want_w), (db_s, want_b)):
        if not filled:
            out.zero_()

    for c0 in range(0, C, block):
        c1 = min(C, c0 + block)
        targets = _Targets(labels, c0, c1)
        p_t = None
        if teacher is not None:
            p_t = teacher.block(c0, c1)[0].div_(T).sub_(stats[:, LSE_T, None]).exp_()
        heads = (
            (student, "s", LSE_CE_S, LSE_KD_S, 0 if terms & TERM_CE else None, 1 if terms & TERM_KD else None),
            (th, "th", LSE_CE_TH, LSE_KD_TH, 2 if terms & TERM_TH_CE else None, 3 if terms & TERM_TH_KD else None),
        )
        for sweep, name, ce_col, kd_col, g_ce, g_kd in heads:
            if sweep is None or (de[name] is None and not (name == "s" and want_w)):  # nothing to compute
                continue
            logits, w, norms = sweep.block(c0, c1)
            g = _head_grad(sweep, logits, targets, p_t, stats, grad, ce_col, kd_col, g_ce, g_kd, T, B)  # (B, n)
            if de[name] is not None:
                de[name] += g @ w
            if name == "s" and want_w:
                dw = g.T @ sweep.rows.e  # (n, D): gradient wrt the (normalized) weights
                if sweep.normalized:
                    dw = normalize_backward(dw, w, norms)
                dW_s[c0:c1] = dw.to(dW_s.dtype)
                if want_b:
                    db_s[c0:c1] = g.sum(0).to(db_s.dtype)

    for name, sweep, out in (("s", student, dz_s), ("th", th, dz_st)):
        if de[name] is None:
            continue
        d = de[name]
        if sweep.normalized:
            d = normalize_backward(d, sweep.rows.e, sweep.rows.e_norms)
        out.copy_(d)
    return dz_s, dz_st, dW_s, db_s


shared_head_chunked = define_shared_head_op("shared_head_chunked", _chunked_forward, sweep_backward)
shared_head_loss_chunked = make_loss_backend(shared_head_chunked)
