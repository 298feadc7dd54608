"""What real checkpoints vary, as test variants: tied or untied LM head, bias flags on or off, sharded or one
file, bf16/fp16/fp32 storage. :func:`family_variant` and :func:`dense_variant` rotate the toggles over the
family rows, so every value of every toggle is exercised by several families without multiplying the
contract by them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from premoe.testing.families import DENSE_FAMILIES, FAMILIES

# Config flags that real releases of a family set either way (Qwen3 with and without attention biases,
# Phi-3.5-MoE's LM-head bias, ERNIE's `use_bias`); qwen2's fixed q/k/v biases have no flag.
BIAS_KEYS = ("attention_bias", "mlp_bias", "use_bias", "lm_head_bias")
# Families whose causal LM cannot share its input embeddings with the LM head: they stay untied.
NO_TIE = {
    "dbrx": "DbrxConfig refuses tie_word_embeddings",
    "kimi_linear": "the causal LM declares no tied weights, so the flag is ignored",
    "nemotron_h": "the causal LM declares no tied weights, so the flag is ignored",
    "inkling2_text": "the causal LM declares no tied weights, so the flag is ignored",
}
DTYPES = ("float32", "bfloat16", "float16")
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Variant:
    """How a tiny checkpoint is built and stored; ``str()`` names it in test ids (``untied-bias-sharded-bf16``).

    ``tied``: the LM head is the input embedding matrix (``None``: the family cannot tie, see :data:`NO_TIE`).
    ``bias``: every :data:`BIAS_KEYS` flag the family's config has, on or off, with biases drawn like trained
    ones (``None``: its config has no such flag). ``sharded``: several safetensors files and
    ``model.safetensors.index.json``. ``dtype``: the storage dtype.
    """

    tied: bool | None = True
    bias: bool | None = None
    sharded: bool = False
    dtype: str = "float32"

    def config(self, model_type: str) -> dict:
        """Config overrides for ``model_type``."""
        out = {k: self.bias for k in bias_keys(model_type)} if self.bias is not None else {}
        if self.tied is not None:
            out["tie_word_embeddings"] = self.tied
        return out

    def __str__(self) -> str:
        parts = [] if self.tied is None else ["tied" if self.tied else "untied"]
        parts += [] if self.bias is None else ["bias" if self.bias else "nobias"]
        return "-".join([*parts, "sharded" if self.sharded else "onefile", _SHORT[self.dtype]])


PLAIN = Variant()  # what the dense builder and save_model do by default: a tied head, one float32 file


@lru_cache(maxsize=None)
def bias_keys(model_type: str) -> tuple[str, ...]:
    """The :data:`BIAS_KEYS` that ``model_type``'s config has."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return ()
    cfg = CONFIG_MAPPING[model_type]()
    return tuple(k for k in BIAS_KEYS if isinstance(getattr(cfg, k, None), bool))


def rotate(rows: dict[str, str]) -> dict[str, Variant]:
    """``{row name: model_type}`` (table order) -> each row's :class:`Variant`: untied/tied alternate over
    the rows that can tie, bias on, off, off, on over the rows with a bias flag, sharding with period 4 and
    the storage dtype with period 3, so each value of each toggle meets each value of the others."""
    out, n_tie, n_bias = {}, 0, 0
    for i, (name, model_type) in enumerate(rows.items()):
        tied = bias = None
        if model_type not in NO_TIE:
            tied, n_tie = n_tie % 2 == 1, n_tie + 1
        if bias_keys(model_type):
            bias, n_bias = n_bias % 4 in (0, 3), n_bias + 1
        out[name] = Variant(tied, bias, sharded=i % 4 in (1, 2), dtype=DTYPES[i % 3])
    return out


def family_variant(name: str) -> Variant:
    """The :class:`Variant` the MoE contract builds row ``name`` of :data:`FAMILIES` as."""
    return _moe_variants()[name]


def dense_variant(name: str) -> Variant:
    """The :class:`Variant` the dense contract builds row ``name`` of :data:`DENSE_FAMILIES` as."""
    return _dense_variants()[name]


@lru_cache(maxsize=1)
def _moe_variants() -> dict[str, Variant]:
    return rotate({name: model_type for name, (model_type, _, _) in FAMILIES.items()})


@lru_cache(maxsize=1)
def _dense_variants() -> dict[str, Variant]:
    return rotate({name: name for name in DENSE_FAMILIES})
