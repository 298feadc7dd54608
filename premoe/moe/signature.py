"""Query signatures: how a model's first MoE routers see a text, before any expert is loaded.

A signature runs the decoder layers up to and including the M-th MoE layer (M = 1 by default, as
in the paper) with every routed expert replaced by :class:`~premoe.moe.selective.ZeroExperts`, and
reduces the routers' outputs over the text's tokens (special tokens excluded) to per-expert means:
the same statistics calibration collects (``prob``, ``tcess``, ``count``, ``official``). For M = 1
this is exactly what the full model's first router sees; for M > 1 the earlier MoE layers
contribute only their shared experts, the same way at calibration and at query time, so stored keys
and queries stay comparable.

The pass stops cleanly because the view simply has no later layers: it is a shallow copy of the
model's base with a truncated layer list, MoE blocks whose experts are stubs and (when serving a
pruned model) full-size routers. It shares every tensor with the model it views.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from premoe.core.modules import backbone, decoder_layers, set_tensor
from premoe.core.options import RunOptions
from premoe.errors import InputError, UnsupportedModelError
from premoe.moe.arch import MoeLayer, find_moe_layers
from premoe.moe.model import ModelInfo
from premoe.moe.observe import Recording, observe
from premoe.moe.scoring import MarkerParams, RoutingSums, layer_markers
from premoe.moe.selective import ByteReader, ZeroExperts, build_model


def _shallow(module: nn.Module) -> nn.Module:
    """A copy sharing tensors and submodules, whose own submodules and tensors can be swapped safely."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


def with_full_router(m: MoeLayer, spec, config, prefix: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of ``m``'s block whose router (a fresh module of its class, built for all experts
    from the unpruned ``config``) and selection biases hold ``tensors`` (full size, by in-memory name)."""
    block = _shallow(m.block)
    router = None
    subs = [config, *(v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type"))]
    for cfg in subs:  # a router is built from the model's config (DBRX: from its ffn_config)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                router = type(m.router)(cfg).eval()
            break
        except (AttributeError, TypeError, KeyError):
            continue
    if router is None:
        raise UnsupportedModelError(
            f"cannot build a full-size {type(m.router).__name__} for signatures of a pruned model"
        )
    fresh = dict(router.state_dict(keep_vars=True))
    for key, t in m.router.state_dict(keep_vars=True).items():  # router tensors without an expert dimension
        if key in fresh and fresh[key].shape == t.shape:
            set_tensor(router, key, t)
    setattr(block, spec.router, router)
    for name, t in tensors.items():
        path = name.removeprefix(prefix + ".")
        if path.startswith(spec.router + "."):
            set_tensor(router, path.removeprefix(spec.router + "."), t)
        elif "." not in path:
            set_tensor(block, path, t)
        else:
            raise UnsupportedModelError(f"router tensor {path} of {spec.name} lives in a submodule premoe cannot swap")
    return block


class SignatureModel:
    """Computes signatures of texts from the first ``layers`` MoE routers of a model.

    Args:
        model: a causal LM (full, pruned, or built without experts) sharing ``info``'s layout.
        info: the source model's layout; routing follows its unpruned router spec.
        tokenizer: the model's tokenizer (its default special tokens).
        layers: number of MoE layers the signature spans (M).
        routers: full-size router tensors to use instead of the model's own, by decoder layer and
            in-memory name (needed when ``model`` is pruned).
    """

    def __init__(
        self,
        model: nn.Module,
        info: ModelInfo,
        tokenizer,
        layers: int = 1,
        routers: dict[int, dict[str, torch.Tensor]] | None = None,
    ):
        spec = info.spec
        if not 1 <= layers <= len(info.moe_layers):
            raise InputError(
                f"signature layers must be between 1 and the model's {len(info.moe_layers)} MoE layers, got {layers}"
            )
        base, attr = backbone(model)
        moe = find_moe_layers(base, spec)[:layers]
        last = moe[-1].index
        by_index = {m.index: m for m in moe}
        new_layers, self.layers = [], []
        for i, layer in enumerate(decoder_layers(base)[: last + 1]):
            m = by_index.get(i)
            if m is None:
                new_layers.append(layer)
                continue
            if routers and i in routers:
                block = with_full_router(m, spec, info.config, info.layout.moe[i]["prefix"], routers[i])
            else:
                block = _shallow(m.block)
            if m.experts is not None:
                setattr(block, spec.experts, ZeroExperts())
            lay = _shallow(layer)
            block_attr = next(b for b in spec.block if getattr(layer, b, None) is m.block)
            setattr(lay, block_attr, block)
            new_layers.append(lay)
            self.layers.append(
                MoeLayer(
                    i,
                    block,
                    getattr(block, spec.router),
                    getattr(block, spec.experts, None) if spec.experts else None,
                    dict(m.router_tensors),
                    dict(m.expert_tensors),
                    m.bias_path,
                )
            )
        self.view = _shallow(base)
        setattr(self.view, attr, nn.ModuleList(new_layers))
        self.info = info
        self.tokenizer = tokenizer
        self.num_layers = layers
        self.params = MarkerParams(k=info.router.top_k)

    @classmethod
    def from_checkpoint(
        cls, info: ModelInfo, tokenizer, layers: int = 1, reader: ByteReader | None = None
    ) -> "SignatureModel":
        """Build from disk: embeddings, the decoder layers up to the M-th MoE layer and their full
        routers; no routed expert is read."""
        if not 1 <= layers <= len(info.moe_layers):
            raise InputError(
                f"signature layers must be between 1 and the model's {len(info.moe_layers)} MoE layers, got {layers}"
            )
        reader = reader or ByteReader()
        model = build_model(
            info, None, reader, num_layers=info.moe_layers[layers - 1] + 1, experts=False, base_only=True
        )
        return cls(model, info, tokenizer, layers)

    def stats(
        self,
        texts: Iterable[str],
        run: RunOptions = RunOptions(progress=False),
        total: int | None = None,
        desc: str = "signature",
        shard=None,
    ) -> RoutingSums:
        """Routing sums of the signature layers over ``texts`` (special tokens not counted; ``shard``: a
        data-parallel rank's share of the batches, :class:`premoe.core.distributed.World`)."""
        what = Recording(self.params, skip_special=True, **({"shard": shard} if shard is not None else {}))
        return observe(self.view, self.layers, self.info, self.tokenizer, texts, what, run=run, total=total, desc=desc)

    def signature(self, text: str, max_length: int = 2048) -> dict[str, torch.Tensor]:
        """Per-expert means of one text, {stat: [layers, E]}.

        Raises:
            InputError: the text is empty or has no tokens other than special ones.
        """
        out = self.signatures([text], max_length)[0]
        if isinstance(out, InputError):
            raise out
        return out

    @torch.inference_mode()
    def signatures(
        self, texts: list[str], max_length: int = 2048, budget: int = 16384
    ) -> list[dict[str, torch.Tensor] | InputError]:
        """:meth:`signature` of each text, computed in padded batches of at most ``budget`` tokens (one
        forward for a queue of short prompts); an :class:`InputError` in place of a text that has none."""
        out: list[dict[str, torch.Tensor] | InputError | None] = [None] * len(texts)
        valid = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        for i in set(range(len(texts))) - set(valid):
            out[i] = InputError("the query is empty; send some text to route")
        rows = []
        if valid:
            enc = self.tokenizer(
                [texts[i] for i in valid], truncation=True, max_length=max_length, return_special_tokens_mask=True
            )
            for i, ids, special in zip(valid, enc["input_ids"], enc["special_tokens_mask"]):
                counted = [1 - s for s in special]
                if sum(counted):
                    rows.append((i, ids, counted))
                else:
                    out[i] = InputError("the query has no tokens besides special tokens; send some text to route")
        rows.sort(key=lambda r: len(r[1]))
        batch: list = []
        for row in rows:  # sorted by length: the padded size of a batch is its count times its last length
            if batch and (len(batch) + 1) * len(row[1]) > budget:
                self._batch_signatures(batch, out)
                batch = []
            batch.append(row)
        if batch:
            self._batch_signatures(batch, out)
        return out

    def _batch_signatures(self, rows: list[tuple[int, list[int], list[int]]], out: list) -> None:
        """One right-padded forward over ``rows`` ((index, ids, count mask)); each row's means go to ``out``."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.view.parameters()).device
        width = max(len(ids) for _, ids, _ in rows)
        ids = torch.tensor([r[1] + [pad] * (width - len(r[1])) for r in rows], device=device)
        attn = torch.tensor([[1] * len(r[1]) + [0] * (width - len(r[1])) for r in rows], device=device)
        counted = torch.tensor([r[2] + [0] * (width - len(r[2])) for r in rows], device=device).reshape(-1).bool()
        owner = torch.arange(len(rows), device=device).repeat_interleave(width)[counted]  # each counted token's row
        spec, at = self.info.router, self.info.router.logits_at
        where = owner.cpu()
        sums: dict[str, torch.Tensor] = {}

        def hook_for(pos: int, layer: MoeLayer):
            def hook(module, args, output):
                logits = output[at] if isinstance(output, (tuple, list)) else output
                logits = logits.detach().reshape(-1, logits.shape[-1])[counted.to(logits.device)]
                for name, m in layer_markers(logits, spec, self.params, layer.selection_bias()).items():
                    acc = sums.setdefault(name, torch.zeros(len(rows), self.num_layers, spec.num_experts).double())
                    acc[:, pos].index_add_(0, where, m.to("cpu", torch.float64))

            return hook

        handles = [layer.router.register_forward_hook(hook_for(p, layer)) for p, layer in enumerate(self.layers)]
        try:
            self.view(input_ids=ids, attention_mask=attn, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        tokens = torch.bincount(where, minlength=len(rows)).to(torch.float64)
        for b, (i, _, _) in enumerate(rows):
            out[i] = {name: (acc[b] / tokens[b]).float() for name, acc in sums.items()}
