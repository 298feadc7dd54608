"""Symmetric integer weight rounding for compressed-tensors ``pack-quantized`` exports: round to nearest, or
GPTQ (Frantar et al., 2022, arXiv 2210.17323) with a given input Gram matrix.

Both use compressed-tensors' scale rule: per group of ``group`` inputs (``None``: per output row),
scale = max|w| / ((2^bits - 1) / 2), rounded to bf16 (a zero scale becomes bf16's eps), and
q = clamp(round(w / scale), -2^(bits-1), 2^(bits-1) - 1).

GPTQ rounds the inputs (columns) one at a time, left to right, and moves each column's rounding error onto the
columns not yet rounded through the inverse of the damped Gram matrix H = XᵀX of the layer's inputs, so the
layer's output on those inputs changes least (the "lazy batch" form: blocks of columns, the error pushed past
a block in one product). A group's scale is taken when its first column is reached, from the weights as the
earlier errors left them (GPTQ's ``static_groups=False``, llm-compressor's default). Inputs that are never
active (a zero diagonal) are rounded to nearest and receive no error. Pure tensor functions, batched over a
leading dimension (a layer's experts at once), float32 weights, float64 factorisation; the device is the
tensors'.
"""

from __future__ import annotations

from typing import Protocol

import torch

DAMP = 0.01  # damping added to H's diagonal, as a fraction of its mean (GPTQ's percdamp)
BLOCK = 128  # columns per lazy-batch block (rounded up to whole groups)


def grid(bits: int) -> tuple[int, int]:
    """The signed integer range of ``bits``-bit weights."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def int_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' symmetric scale of each row of ``w`` [..., n] over its last dim, in bf16 [...]."""
    scale = (w.float().abs().amax(dim=-1) / ((2**bits - 1) / 2)).to(torch.bfloat16)
    eps = torch.tensor(torch.finfo(torch.bfloat16).eps, dtype=torch.bfloat16, device=scale.device)
    return torch.where(scale == 0, eps, scale)


def round_to_nearest(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [..., out, in] as integers (int16, same shape) and bf16 scales [..., out, in / group] (``group``
    ``None``: [..., out, 1])."""
    x = w.float()
    g = x.unflatten(-1, (-1, group)) if group is not None else x.unsqueeze(-2)
    scale = int_scale(g, bits)
    lo, hi = grid(bits)
    q = torch.clamp(torch.round(g / scale.float().unsqueeze(-1)), lo, hi).flatten(-2)
    return q.to(torch.int16), scale


def _inverse_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the inverse of the damped ``hessian`` [B, n, n], float32; dead inputs [B, n])."""
    H = hessian.double().clone()
    d = H.diagonal(dim1=-2, dim2=-1)
    dead = ~(d > 0)  # also NaN
    H[dead.unsqueeze(-1) | dead.unsqueeze(-2)] = 0.0  # a dead input couples to nothing
    d[dead] = 1.0
    mean = d.mean(-1, keepdim=True)
    for attempt in range(6):  # more damping if rounding leaves the matrix indefinite
        Hd = H.clone()
        Hd.diagonal(dim1=-2, dim2=-1).add_(damp * 10**attempt * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if not bool(info.any()):
            break
    else:
        raise ValueError("the input Gram matrix is not positive definite even with damping")
    inv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(inv, upper=True).float(), dead


class Grid(Protocol):
    """Values GPTQ rounds onto (:func:`gptq_on_grid`): a scale per group of inputs of a row, and the nearest
    grid value of a column under it."""

    def scale(self, w: torch.Tensor) -> torch.Tensor: ...  # [B, out, g] -> [B, out]

    def snap(self, col: torch.Tensor, scale: torch.Tensor) -> torch.Tensor: ...  # [B, out] -> [B, out]


class IntGrid:
    """compressed-tensors' symmetric ``bits``-bit integers, one bf16 scale per group (or row)."""

    def __init__(self, bits: int):
        self.lo, self.hi = grid(bits)
        self.bits = bits

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return int_scale(w, self.bits).float()

    def snap(self, col: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(col / scale), self.lo, self.hi) * scale


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group: int | None,
    damp: float = DAMP,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` [out, in] (or [B, out, in]) with input Gram matrix ``hessian`` [in, in] (or [B, in, in]):
    integers (int16, ``w``'s shape) and bf16 scales, as :func:`round_to_nearest` returns them.

    Raises:
        ValueError: ``group`` does not divide the inputs, or shapes disagree.
    """
    if group is not None and w.shape[-1] % group:
        raise ValueError(f"group size {group} does not divide {w.shape[-1]} inputs")
    values, scales = gptq_on_grid(w, hessian, IntGrid(bits), group, damp, block)
    per = w.shape[-1] if group is None else group
    codes = torch.round(values / scales.repeat_interleave(per, dim=-1)).to(torch.int16)
    return codes, scales.to(torch.bfloat16)


def gptq_on_grid(
    w: torch.Tensor,
    hessian: torch.Tensor,
    on: Grid,
    group: int | None,
    damp: float = DAMP,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` [out, in] (or [B, out, in]) onto any grid of values with a scale per ``group`` inputs of
    a row (``None``: per row, taken before any update): ``on.scale(w [B, out, g]) -> [B, out]`` gives a group's
    scale from its (updated) weights, ``on.snap(column [B, out], scale) -> [B, out]`` the nearest grid value
    (dequantised). A last group shorter than ``group`` is allowed. Returns the rounded weights (float32, on
    the grid, ``w``'s shape) and the scales used (float32 [..., out, groups]).

    Raises:
        ValueError: shapes disagree.
    """
    single = w.dim() == 2
    W = (w[None] if single else w).float().clone()
    H = hessian[None] if single else hessian
    B, rows, cols = W.shape
    if H.shape != (B, cols, cols):
        raise ValueError(f"the Gram matrix {list(hessian.shape)} does not match weights {list(w.shape)}")
    U, _dead = _inverse_factor(H.to(W.device), damp)
    Q = torch.empty(B, rows, cols, dtype=torch.float32, device=W.device)
    if group is None:
        scales = on.scale(W).unsqueeze(-1)  # [B, rows, 1]: whole rows, before any update
        sf = scales[..., 0]
    else:
        scales = torch.empty(B, rows, -(-cols // group), dtype=torch.float32, device=W.device)
        sf = None
        block = -(-block // group) * group
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if group is not None and c % group == 0:
                sf = on.scale(W1[:, :, i : i + group])
                scales[:, :, c // group] = sf
            col = W1[:, :, i]
            q = on.snap(col, sf)
            Q[:, :, c] = q
            err = (col - q) / U1[:, i, i].unsqueeze(-1)
            W1[:, :, i:] -= err.unsqueeze(-1) * U1[:, i, i:].unsqueeze(1)
            E1[:, :, i] = err
        if i2 < cols:
            W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]
    return (Q[0], scales[0]) if single else (Q, scales)


def output_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """The squared output error sum_x ||(W - deq(Q)) x||² over the inputs whose Gram matrix is ``hessian``, for
    [out, in] weights (a test and benchmark measure)."""
    group = w.shape[-1] // scale.shape[-1]
    deq = q.float() * scale.float().repeat_interleave(group, dim=-1)
    d = (w.float() - deq).double()
    return torch.einsum("oi,ij,oj->", d, hessian.double(), d)
