"""The providers of bench/shared_head_loss.py: the two cases, their inputs, and one forward+backward step of each
provider (a loss backend, ``torch.compile`` of the reference, Liger-Kernel), or why it does not apply."""

from __future__ import annotations

import importlib.util
import re

import torch

from edgekd.heads import HeadSpec
from edgekd.kernels import interpreting
from edgekd.losses import LossWeights, shared_head_loss

CASES = {
    "plain_ce": (HeadSpec("linear", 1.0, 0.0), LossWeights(ce=1.0)),
    "full": (HeadSpec("arcface", 64.0, 0.5), LossWeights(ce=1.0, kd=1.0, th_ce=1.0, th_kd=1.0, T=4.0)),
}
PROVIDERS = ("reference", "compile", "chunked", "triton", "liger")


def make_inputs(case: str, B: int, D: int, C: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    x = {"z_s": rand(B, D).requires_grad_(), "W_s": rand(C, D, scale=0.05).requires_grad_()}
    x["labels"] = torch.randint(0, C, (B,), generator=g, device=device)
    if case == "plain_ce":
        x["b_s"] = rand(C).requires_grad_()
    else:
        x["W_t"], x["z_t"] = rand(C, D, scale=0.05), rand(B, D)
    return x


def loss_args(x: dict) -> tuple:
    """Positional arguments of ``loss_of``: the inputs, None where a case has none."""
    return tuple(x.get(k) for k in ("z_s", "labels", "W_s", "b_s", "W_t", "z_t"))


def loss_of(case: str, backend: str):
    """``loss(z_s, labels, W_s, b_s, W_t, z_t) -> total`` of one backend on one case."""
    head, weights = CASES[case]

    def loss(z_s, labels, W_s, b_s, W_t, z_t):
        return shared_head_loss(z_s, labels, W_s=W_s, b_s=b_s, W_t=W_t, z_t=z_t, head=head, weights=weights,
                                backend=backend)[0]  # fmt: skip

    return loss


def compiled_reference(case: str, x: dict, compile_backend: str):
    """``torch.compile(fullgraph=True)`` of the reference loss, the class count marked dynamic on every C-sized input.

    The inputs are arguments (not closure variables) so the dynamic marks apply; Dynamo may still specialize
    (``maybe_mark_dynamic`` does not insist).
    """
    for name in ("W_s", "b_s", "W_t"):
        if x.get(name) is not None:
            torch._dynamo.maybe_mark_dynamic(x[name], 0)
    return torch.compile(loss_of(case, "reference"), fullgraph=True, backend=compile_backend)


def liger_loss(x: dict):
    """Liger-Kernel's fused linear cross entropy (its defaults) on the plain-CE inputs."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    flce = LigerFusedLinearCrossEntropyLoss()
    return lambda: flce(x["W_s"], x["z_s"], x["labels"], x["b_s"])


def make_step(provider: str, case: str, x: dict, compile_backend: str = "inductor"):
    """A closure running one forward+backward, or a string saying why the provider does not apply."""
    device = x["z_s"].device
    if provider == "liger":
        if case != "plain_ce":
            return "plain CE only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "not installed"
        if device.type != "cuda":
            return "GPU only"
        fn = liger_loss(x)
    elif provider == "triton" and device.type != "cuda" and not interpreting():
        return "GPU only (the CPU runs it only in Triton's interpreter, for tests)"
    elif provider == "compile":
        compiled = compiled_reference(case, x, compile_backend)
        fn = lambda: compiled(*loss_args(x))  # noqa: E731
    else:
        loss = loss_of(case, provider)
        fn = lambda: loss(*loss_args(x))  # noqa: E731

    def step():
        fn().backward()

    return step


def clear_grads(x: dict) -> None:
    for k in ("z_s", "W_s", "b_s"):
        if k in x:
            x[k].grad = None


def fits(provider: str, case: str, B: int, D: int, C: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Rough check that inputs plus the provider's transient memory fit in half the free memory."""
    item = torch.finfo(dtype).bits // 8
    inputs = (2 if case == "plain_ce" else 3) * C * D * item
    logits = B * C * 4 * (3 if case == "plain_ce" else 12) if provider in ("reference", "compile") else 0
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        with open("/proc/meminfo") as f:
            free = int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    return inputs + logits < 0.5 * free
