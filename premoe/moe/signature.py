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
from premoe.moe.scoring import MarkerParams, RoutingSums
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
    ) -> RoutingSums:
        """Routing sums of the signature layers over ``texts`` (special tokens not counted)."""
        what = Recording(self.params, skip_special=True)
        return observe(self.view, self.layers, self.info, self.tokenizer, texts, what, run=run, total=total, desc=desc)

    def signature(self, text: str, max_length: int = 2048) -> dict[str, torch.Tensor]:
        """Per-expert means of one text, {stat: [layers, E]}.

        Raises:
            InputError: the text has no tokens other than special ones.
        """
        if not isinstance(text, str) or not text.strip():
            raise InputError("the query is empty; send some text to route")
        sums = self.stats([text], run=RunOptions(max_length=max_length, progress=False))
        if sums.tokens == 0:
            raise InputError("the query has no tokens besides special tokens; send some text to route")
        return sums.means()
