"""Data and comparisons the tests share: two small tasks, logits, state equality, dense-switch byte counts,
random kept sets and sliced routers."""

from __future__ import annotations

import torch

# Two small tasks with different prompts: stores to route between, plans to switch between.
TWO_TASKS = {
    "a": [{"prompt": "add 1+2=", "completion": "3"}, {"prompt": "add 15+7=", "completion": "22"}],
    "b": [{"prompt": "reverse abcd=", "completion": "dcba"}, {"prompt": "sort 9142=", "completion": "1249"}],
}


def logits_of(model, tok, text: str = "ab") -> torch.Tensor:
    """[S, V] float32 logits of ``text`` (with BOS)."""
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt"), use_cache=False).logits[0].float()


def state_equal(a, b) -> bool:
    """The same tensor names, dtypes and values."""
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def assert_same_dense(a, b, prompts: torch.Tensor | None = None) -> None:
    """Two dense models hold the same tensors (names, dtypes, values) and give the same logits."""
    prompts = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 3, 4, 12, 2]]) if prompts is None else prompts
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.config.num_attention_heads == b.config.num_attention_heads
    with torch.no_grad():
        assert torch.equal(a(prompts).logits, b(prompts).logits)


def switch_bytes(info, old, new, min_run_bytes: int) -> int:
    """What a dense task switch from plan ``old`` to ``new`` should read, from the plans alone: the missing
    rows; the missing columns, or the whole tensor where their runs are short; and every checkpoint bias
    either plan compensates."""
    from premoe.dense.model import slices
    from premoe.dense.switch import runs

    total = 0
    for layer in range(info.num_layers):
        before, after = slices(info, old, layer), slices(info, new, layer)
        for name, (dim, ids) in after.items():
            t = info.checkpoint.tensors[name]
            missing = sorted(set(ids) - set(before[name][1]))
            per = t.nbytes // t.shape[dim]  # bytes of one slice along dim
            if not missing:
                continue
            if dim == 0 or len(missing) * per >= min_run_bytes * len(runs(missing)) * t.shape[0]:
                total += len(missing) * per
            else:
                total += t.nbytes
        for which in ("o", "down"):
            name = info.key(layer, which, "bias")
            if name in info.checkpoint.tensors and (f"{layer}.{which}" in old.bias or f"{layer}.{which}" in new.bias):
                total += info.checkpoint.tensors[name].nbytes
    return total


def random_kept(spec, keep: int, seed: int) -> list[int]:
    """A random kept set of ``keep`` experts for router ``spec``, balanced across groups where it limits them."""
    g = torch.Generator().manual_seed(seed)
    if not spec.group_limited:
        return sorted(torch.randperm(spec.num_experts, generator=g)[:keep].tolist())
    size = spec.num_experts // spec.n_group
    return sorted(
        gi * size + int(e)
        for gi in range(spec.n_group)
        for e in torch.randperm(size, generator=g)[: keep // spec.n_group]
    )


def sliced_router(spec, keep: int):
    """``spec`` as pruned to ``keep`` experts."""
    import dataclasses

    return dataclasses.replace(spec, num_experts=keep, top_k=min(spec.top_k, keep))
