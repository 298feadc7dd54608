"""Tiny models of every supported family, for tests and benchmarks (nothing is downloaded).

* :mod:`premoe.testing.families`: the contract tables (``FAMILIES``, ``DENSE_FAMILIES``);
* :mod:`premoe.testing.variants`: each row's variant of what real checkpoints vary;
* :mod:`premoe.testing.builders`: building and saving the tiny models, and quantised hub layouts;
* :mod:`premoe.testing.checks`: data and comparisons the tests share.
"""

from premoe.testing.builders import (
    bpe_tokenizer,
    build_dense_family,
    build_dense_model,
    build_family,
    build_model,
    config_hidden,
    quantize_checkpoint,
    save_model,
)
from premoe.testing.checks import (
    TWO_TASKS,
    assert_same_dense,
    logits_of,
    random_kept,
    sliced_router,
    state_equal,
    switch_bytes,
)
from premoe.testing.families import COMMON, DENSE_FAMILIES, DSV3, E8, FAMILIES, MLA
from premoe.testing.variants import (
    BIAS_KEYS,
    DTYPES,
    NO_TIE,
    PLAIN,
    Variant,
    bias_keys,
    dense_variant,
    family_variant,
    rotate,
)

__all__ = [
    "FAMILIES",
    "DENSE_FAMILIES",
    "COMMON",
    "MLA",
    "E8",
    "DSV3",
    "Variant",
    "PLAIN",
    "BIAS_KEYS",
    "DTYPES",
    "NO_TIE",
    "bias_keys",
    "rotate",
    "family_variant",
    "dense_variant",
    "build_family",
    "build_model",
    "bpe_tokenizer",
    "build_dense_model",
    "build_dense_family",
    "config_hidden",
    "save_model",
    "quantize_checkpoint",
    "TWO_TASKS",
    "logits_of",
    "state_equal",
    "assert_same_dense",
    "switch_bytes",
    "random_kept",
    "sliced_router",
]
