"""Calibration of dense models: streaming activation statistics of every layer's ``o_proj`` and
``down_proj`` inputs (the quantities SEAP, Wanda-sp and FLAP score), the weight column norms, and
the retrieval keys (mean hidden states of the task's prompts at every depth).

Statistics are kept as float64 sums over the real tokens of each batch (padding masked out), so
memory is flat in the number of samples and batching does not change the result.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from premoe.core.data import CalibrationData
from premoe.core.modelio import resolve_device
from premoe.core.store import PatternStore, TaskPattern, check_task_name
from premoe.dense.model import DenseInfo, inspect_dense
from premoe.errors import InputError

log = logging.getLogger(__name__)
SITES = ("o", "down")  # the inputs of these projections are observed


class ActivationStats:
    """Per-channel float64 sums (count, sum, sum of squares) of the inputs of every layer's
    ``o_proj`` and ``down_proj``, fed by forward pre-hooks; :attr:`mask` is the [B*S] token mask."""

    def __init__(self, model: torch.nn.Module, info: DenseInfo):
        self.info = info
        self.mask: torch.Tensor | None = None
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}
        self._hooks = []
        layers = model.get_submodule(info.decoder_prefix)
        for l, layer in enumerate(layers):
            for site, mod in (("o", getattr(getattr(layer, info.spec.attn), info.spec.o)),
                              ("down", getattr(getattr(layer, info.spec.mlp), info.spec.down))):
                self._hooks.append(mod.register_forward_pre_hook(self._hook(l, site)))

    def _hook(self, layer: int, site: str):
        def hook(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if self.mask is not None:
                x = x[self.mask.to(x.device)]
            x = x.double()
            for stat, v in (("sum", x.sum(0)), ("sq", (x * x).sum(0))):
                key = f"{site}.{stat}"
                if key not in self.sums:
                    self.sums[key] = torch.zeros(self.info.num_layers, x.shape[1], dtype=torch.float64)
                self.sums[key][layer] += v.cpu()
        return hook

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def means(self) -> dict[str, torch.Tensor]:
        """{"o.mean", "o.sq" (E[x^2]), "o.var", "down.mean", ...}: [L, C] float32."""
        out = {}
        for site in SITES:
            mean = self.sums[f"{site}.sum"] / self.n
            sq = self.sums[f"{site}.sq"] / self.n
            out[f"{site}.mean"] = mean.float()
            out[f"{site}.sq"] = sq.float()
            out[f"{site}.var"] = (sq - mean * mean).clamp_min(0).float()
        return out


def weight_norms(model: torch.nn.Module, info: DenseInfo) -> dict[str, torch.Tensor]:
    """Column statistics of every ``o_proj``/``down_proj``: squared L2 norm (SEAP, FLAP) and mean
    absolute value (Wanda-sp), [L, C] float32."""
    out: dict[str, list[torch.Tensor]] = {}
    for layer in model.get_submodule(info.decoder_prefix):
        for site, mod in (("o", getattr(getattr(layer, info.spec.attn), info.spec.o)),
                          ("down", getattr(getattr(layer, info.spec.mlp), info.spec.down))):
            w = mod.weight.detach().float()
            out.setdefault(f"w.{site}.l2sq", []).append((w * w).sum(0).cpu())
            out.setdefault(f"w.{site}.l1mean", []).append(w.abs().mean(0).cpu())
    return {k: torch.stack(v) for k, v in out.items()}


def _batches(tok, texts: Iterable[str], batch_size: int, max_length: int, skip_special: bool):
    from premoe.moe.observe import _batches as token_batches

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for rows in token_batches(tok, texts, batch_size, max_length, skip_special):
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
        attn = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
        count = torch.tensor([r[1] + [0] * (width - len(r[1])) for r in rows], dtype=torch.bool)
        yield ids, attn, count


@torch.inference_mode()
def observe_dense(model, info: DenseInfo, tok, texts: Iterable[str], *, batch_size: int = 16, max_length: int = 2048,
                  total: int | None = None, progress: bool = True, desc: str = "calibrate") -> tuple[dict[str, torch.Tensor], int]:
    """Activation statistics over ``texts`` (every real token counts once): (means, tokens)."""
    dev = next(model.parameters()).device
    stats = ActivationStats(model, info)
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress)
    try:
        for ids, attn, _count in _batches(tok, texts, batch_size, max_length, skip_special=False):
            stats.mask = attn.reshape(-1).bool()
            stats.n += int(stats.mask.sum())
            model.model(input_ids=ids.to(dev), attention_mask=attn.to(dev)) if hasattr(model, "model") else model(
                input_ids=ids.to(dev), attention_mask=attn.to(dev))
            bar.update(ids.shape[0])
    finally:
        stats.close()
        bar.close()
    if stats.n == 0:
        raise InputError("the tokenizer produced no tokens from the calibration data")
    return stats.means(), stats.n


@torch.inference_mode()
def prompt_features(model, info: DenseInfo, tok, texts: Iterable[str], *, layers: int | None = None, batch_size: int = 32,
                    max_length: int = 2048) -> torch.Tensor:
    """[N, K+1, D] per-prompt mean hidden states (special tokens left out) after the embeddings
    (index 0) and after each of the first K decoder layers (all of them by default), L2-normalised."""
    dev = next(model.parameters()).device
    texts = list(texts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    feats = []
    for i in range(0, len(texts), batch_size):  # in input order
        enc = tok(texts[i : i + batch_size], truncation=True, max_length=max_length, return_special_tokens_mask=True)
        width = max(max(len(x) for x in enc["input_ids"]), 1)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in enc["input_ids"]])
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in enc["input_ids"]])
        count = torch.tensor([[1 - s for s in sp] + [0] * (width - len(sp)) for sp in enc["special_tokens_mask"]])
        out = model.model(input_ids=ids.to(dev), attention_mask=attn.to(dev), output_hidden_states=True)
        hs = out.hidden_states if layers is None else out.hidden_states[: layers + 1]
        m = (count * attn).to(dev).float()[..., None]
        m = torch.where(m.sum(1, keepdim=True) > 0, m, attn.to(dev).float()[..., None])  # prompts of special tokens only
        per = torch.stack([(h.float() * m).sum(1) / m.sum(1).clamp_min(1) for h in hs], dim=1)  # [B, K+1, D]
        feats.append(torch.nn.functional.normalize(per, dim=-1).cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 0, info.hidden)


def calibrate_dense(
    model: str | Path,
    data: str | Path | list[str | Path],
    task: str,
    store: str | Path,
    *,
    max_samples: int | None = None,
    batch_size: int = 16,
    max_length: int = 2048,
    device: str | None = None,
    dtype: str | None = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> TaskPattern:
    """Calibrate ``task`` of a dense model: activation statistics and retrieval keys into ``store``."""
    from premoe.dense.model import load_dense

    check_task_name(task)
    cal = CalibrationData.open(data, max_samples, batch_size, max_length)
    n_samples = cal.samples
    info = inspect_dense(model)
    st = PatternStore(store)
    st.check_new_task(info.fingerprint, task, overwrite)
    _, lm, tok = load_dense(info.path, device=resolve_device(device), dtype=dtype)
    means, tokens = observe_dense(lm, info, tok, (r.text for r in cal.records()), batch_size=batch_size,
                                  max_length=max_length, total=n_samples, progress=progress, desc=f"calibrate {task}")
    means.update(weight_norms(lm, info))
    feats = prompt_features(lm, info, tok, [r.prompt for r in cal.records()], batch_size=batch_size,
                            max_length=max_length)
    signature = {"prompt.hidden": feats.mean(0)}  # [L+1, D] centroid per depth
    pattern = TaskPattern(
        name=task, layers=[], scores=torch.zeros(0, 0), means=means,
        info={"kind": "dense", "samples": n_samples, "tokens": tokens, "scorer": "seap",
              "params": {"max_length": max_length},
              "data": cal.describe(),
              "signature": {"layers": info.num_layers, "prompts": len(feats)}},
        signature=signature,
    )
    st.add(pattern, info.fingerprint, overwrite=overwrite)
    log.info("calibrated %s (dense): %d samples, %d tokens -> %s", task, n_samples, tokens, st.path)
    return pattern
