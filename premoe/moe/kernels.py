"""A CPU experts kernel for transformers 5 fused MoE layers: "premoe_bucketed".

On the CPU, bf16/fp16 matmuls go through oneDNN, which builds and caches one primitive (about
1 MB of state) per distinct shape. In an MoE layer every expert sees a different number of tokens,
so nearly every call has a new shape: the cache (1024 entries by default) fills with primitives
used once, costing memory (hundreds of MB while serving) and time. This kernel pads each expert's
token block to one of a few bucket sizes (powers of two up to 64, then multiples of 64), so few
shapes recur; padded rows are computed and discarded. Results match the eager kernel row for row.

It is registered under transformers' own extension point (``ExpertsInterface``); premoe selects it
for the models it runs on the CPU (:func:`select_kernel`). Exported checkpoints are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "premoe_bucketed"


def bucket(count: int) -> int:
    """Padded block size for ``count`` tokens."""
    if count <= 64:
        return 1 << (count - 1).bit_length()
    return -(-count // 64) * 64


def slot_outputs(ids: torch.Tensor, run, width: int) -> torch.Tensor:
    """[T, c, width] float32: at ``[t, j]`` the output ``run(e, rows)`` [n, width] gives for expert
    ``e = ids[t, j]``, each expert run once on all the tokens (``rows``) that list it."""
    out = torch.zeros(*ids.shape, width, dtype=torch.float32, device=ids.device)
    for e in ids.unique().tolist():
        rows, slots = torch.where(ids == e)
        out[rows, slots] = run(e, rows).float()
    return out


def expert_forward(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s output for inputs ``x`` [N, H] -> [N, H], from the fused weight slices, before
    routing weights are applied. Covers transformers' experts interface (concatenated or interleaved
    gate/up, transposed or not, with or without biases or a gate), Llama-4's transposed experts, DBRX's
    [E x I, H] row blocks, and zero-computation experts (ids past the routed ones: the identity)."""
    if hasattr(experts, "has_gate"):
        up_name = "gate_up_proj" if experts.has_gate else "up_proj"
        up_w, down_w = getattr(experts, up_name), experts.down_proj
        if e >= down_w.shape[0]:
            return x
        h = x @ up_w[e] if experts.is_transposed else F.linear(x, up_w[e])
        if experts.has_bias:
            h = h + getattr(experts, f"{up_name}_bias")[e]
        h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        y = h @ down_w[e] if experts.is_transposed else F.linear(h, down_w[e])
        if experts.has_bias:
            y = y + experts.down_proj_bias[e]
        if getattr(experts, "has_post_expert_norm", False):
            y = experts.post_expert_norm(y)
        return y
    mlp = getattr(experts, "mlp", None)
    if mlp is not None and hasattr(mlp, "w1"):  # DBRX: [E * I, H] blocks
        shape = (-1, experts.ffn_hidden_size, experts.hidden_size)
        w1, v1, w2 = (t.view(shape)[e] for t in (mlp.w1, mlp.v1, mlp.w2))
        return (mlp.activation_fn(x @ w1.T) * (x @ v1.T)) @ w2
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if e >= down.shape[0]:  # LongCat-Flash zero-computation expert
        return x
    act = getattr(experts, "act_fn", F.silu)
    transposed = gate_up.shape[-2] == x.shape[-1] and gate_up.shape[-1] != x.shape[-1]
    gate, up = (x @ gate_up[e] if transposed else F.linear(x, gate_up[e])).chunk(2, dim=-1)
    h = act(gate) * up
    return h @ down[e] if transposed else F.linear(h, down[e])


def bucketed_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward with per-expert token blocks padded to bucket sizes.

    Shapes: hidden_states [T, H], top_k_index / top_k_weights [T, K]; returns [T, H]. Ids at or above
    ``num_experts`` (expert-parallel sentinels) are skipped, as in the eager kernel.
    """
    k = top_k_index.shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    tokens = order // k
    weights = top_k_weights.reshape(-1)[order]
    # half-precision index_add_ is ~20x slower than float32 on CPUs (and rounds every addition): sum in float32
    half = hidden_states.dtype in (torch.bfloat16, torch.float16) and hidden_states.device.type == "cpu"
    out = torch.zeros(
        hidden_states.shape, dtype=torch.float32 if half else hidden_states.dtype, device=hidden_states.device
    )
    start = 0
    for e, c in enumerate(counts[: self.num_experts]):
        if c == 0:
            continue
        rows = slice(start, start + c)
        start += c
        idx = tokens[rows]
        x = hidden_states[idx]
        pad = bucket(c) - c
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        y = expert_forward(self, e, x)[:c] * weights[rows, None].to(hidden_states.dtype)
        out.index_add_(0, idx, y.to(out.dtype))
    return out.to(hidden_states.dtype)


def register() -> str:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if NAME not in ALL_EXPERTS_FUNCTIONS.valid_keys():
        ALL_EXPERTS_FUNCTIONS.register(NAME, bucketed_experts_forward)
    return NAME


def select_kernel(model: nn.Module, device: torch.device | None = None) -> None:
    """The bucketed kernel when ``model`` runs on the CPU or holds experts as stored (it asks for one expert at
    a time), transformers' default elsewhere (``device``: where it will run, for a model whose weights are
    not loaded yet)."""
    if not hasattr(model, "set_experts_implementation"):
        return
    if device is None:
        try:
            device = next(p.device for p in model.parameters() if not p.is_meta)
        except StopIteration:
            return
    from premoe.moe.held import held_bytes

    try:
        if device.type == "cpu" or held_bytes(model):  # experts held as stored: one at a time, on any device
            model.set_experts_implementation(register())
        elif model.config._experts_implementation == NAME:
            model.set_experts_implementation("grouped_mm")
    except (ValueError, AttributeError, ImportError):  # no experts interface here: leave it as is
        pass
