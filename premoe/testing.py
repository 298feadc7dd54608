"""Tiny models of every supported family, for tests and benchmarks (nothing is downloaded).

``FAMILIES`` is the shared contract table: every entry goes through the same checks (routing
reproduction, calibration, pruning, export, reload, exactness). Router weights get a larger scale
than the default init so routing is decisive, as in trained models.

Each row of ``FAMILIES`` and ``DENSE_FAMILIES`` is also built as one :class:`Variant` of what real
checkpoints vary (tied or untied LM head, bias flags on or off, sharded or one file, bf16/fp16/fp32
storage): :func:`family_variant` and :func:`dense_variant` rotate the toggles over the rows, so every
value of every toggle is exercised by several families without multiplying the contract by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from premoe.core.tasks import char_tokenizer

COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# name -> (model_type, config overrides, is pruning to a superset of the routed experts exact?). Not exact:
# softmax over all experts without renormalising over the chosen ones, where dropping experts shrinks the
# denominator (see the README's exactness contract).
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
E8 = dict(num_experts_per_tok=2, moe_intermediate_size=16)
DSV3 = dict(
    n_routed_experts=8,
    **E8,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    norm_topk_prob=True,
    **MLA,
)
FAMILIES: dict[str, tuple[str, dict, bool]] = {
    "mixtral": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2), True),
    "minimax": (
        "minimax",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
        True,
    ),
    "qwen2_moe": (
        "qwen2_moe",
        dict(num_experts=8, **E8, shared_expert_intermediate_size=24, mlp_only_layers=[1], norm_topk_prob=False),
        False,
    ),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, **E8, head_dim=8, norm_topk_prob=True), True),
    "qwen3_next": (
        "qwen3_next",
        dict(
            num_experts=8,
            **E8,
            head_dim=8,
            shared_expert_intermediate_size=24,
            norm_topk_prob=True,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
        True,
    ),
    "qwen3_5_moe_text": (
        "qwen3_5_moe_text",
        dict(
            num_experts=8,
            **E8,
            head_dim=8,
            shared_expert_intermediate_size=24,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
        True,
    ),
    "mellum": ("mellum", dict(num_local_experts=8, **E8, norm_topk_prob=True), True),
    "lara_mini": (
        "lara_mini",
        dict(num_experts=8, **E8, shared_expert_intermediate_size=24, norm_topk_prob=True),
        True,
    ),
    "olmoe": ("olmoe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False), False),
    "flex_olmo": ("flex_olmo", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True), True),
    "deepseek_v2": (
        "deepseek_v2",
        dict(
            n_routed_experts=8,
            **E8,
            first_k_dense_replace=1,
            topk_method="greedy",
            n_shared_experts=1,
            **{**MLA, "q_lora_rank": None},
        ),
        False,
    ),
    "deepseek_v3": ("deepseek_v3", DSV3, True),
    "deepseek_v32": (
        "deepseek_v32",
        dict(DSV3, n_group=1, topk_group=1, index_n_heads=2, index_head_dim=16, index_topk=8),
        True,
    ),
    "dots1": (
        "dots1",
        dict(
            n_routed_experts=8,
            **E8,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            norm_topk_prob=True,
            head_dim=8,
        ),
        True,
    ),
    "glm4_moe": (
        "glm4_moe",
        dict(
            n_routed_experts=8,
            **E8,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            norm_topk_prob=True,
            head_dim=8,
        ),
        True,
    ),
    "glm4_moe_lite": ("glm4_moe_lite", dict(DSV3, first_k_dense_replace=1), True),
    "glm_moe_dsa": (
        "glm_moe_dsa",
        dict(DSV3, n_group=1, topk_group=1, index_n_heads=2, index_head_dim=16, index_topk=8),
        True,
    ),
    "solar_open": (
        "solar_open",
        dict(n_routed_experts=8, **E8, n_group=1, topk_group=1, n_shared_experts=1, head_dim=8),
        True,
    ),
    "hy_v4": (
        "hy_v4",
        dict(
            n_routed_experts=8, **E8, first_k_dense_replace=1, n_group=2, topk_group=1, n_shared_experts=1, head_dim=8
        ),
        True,
    ),
    "axk1": ("axk1", DSV3, True),
    "exaone_moe": (
        "exaone_moe",
        dict(num_experts=8, **E8, first_k_dense_replace=1, n_group=2, topk_group=1, num_shared_experts=1, head_dim=8),
        True,
    ),
    "kimi_linear": (
        "kimi_linear",
        dict(
            num_experts=8,
            **E8,
            first_k_dense_replace=1,
            num_shared_experts=1,
            moe_renormalize=True,
            linear_head_dim=8,
            linear_num_heads=4,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            **MLA,
        ),
        True,
    ),
    "mimo_v2_flash": (
        "mimo_v2_flash",
        dict(n_routed_experts=8, **E8, first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8),
        True,
    ),
    "nemotron_h": (
        "nemotron_h",
        dict(
            n_routed_experts=8,
            **E8,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            moe_shared_expert_intermediate_size=24,
            head_dim=8,
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=8,
            n_groups=1,
            chunk_size=16,
            layers_block_type=["mamba", "moe", "attention"],
        ),
        True,
    ),
    "beam": (
        "beam",
        dict(
            num_experts=8,
            **E8,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            head_dim=8,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
        True,
    ),
    "gpt_oss": (
        "gpt_oss",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=16,
        ),
        True,
    ),
    "granitemoe": ("granitemoe", dict(num_local_experts=8, num_experts_per_tok=2), True),
    "granitemoeshared": (
        "granitemoeshared",
        dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=24),
        True,
    ),
    "granitemoehybrid": (
        "granitemoehybrid",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            shared_intermediate_size=24,
            mamba_n_heads=4,
            mamba_d_state=8,
            mamba_d_head=16,
            mamba_chunk_size=16,
            layer_types=["mamba", "attention", "mamba"],
        ),
        True,
    ),
    "granitemoe_swa": ("granitemoe_swa", dict(num_local_experts=8, num_experts_per_tok=2), True),
    "aria_text": ("aria_text", dict(moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1), True),
    "cohere2_moe": ("cohere2_moe", dict(num_experts=8, num_experts_per_tok=2, num_shared_experts=1), True),
    "jamba": (
        "jamba",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=False,
        ),
        False,
    ),
    "phimoe": ("phimoe", dict(num_local_experts=8, num_experts_per_tok=2), False),  # sparsemixer sees near-max losers
    "llama4_text": (
        "llama4_text",
        dict(
            num_local_experts=8,
            num_experts_per_tok=1,
            head_dim=8,
            intermediate_size_mlp=48,
            interleave_moe_layer_step=1,
        ),
        True,
    ),
    "minimax_m2": ("minimax_m2", dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8), True),
    "hy_v3": ("hy_v3", dict(num_experts=8, **E8, first_k_dense_replace=1, num_shared_experts=1, head_dim=8), True),
    "laguna": (
        "laguna",
        dict(num_experts=8, **E8, shared_expert_intermediate_size=24, head_dim=8, moe_router_logit_softcapping=10.0),
        True,
    ),
    "flint": (
        "flint",
        dict(
            num_experts=8,
            **E8,
            shared_expert_intermediate_size=24,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            head_dim=8,
        ),
        True,
    ),
    "kolibri1": (
        "kolibri1",
        dict(num_local_experts=8, **E8, shared_expert_intermediate_size=24, norm_topk_prob=True, head_dim=8),
        True,
    ),
    "inkling2_text": (
        "inkling2_text",
        dict(n_routed_experts=8, **E8, head_dim=8, unpadded_vocab_size=len(char_tokenizer())),
        True,
    ),
    "ernie4_5_moe": (
        "ernie4_5_moe",
        dict(
            moe_num_experts=8,
            moe_k=2,
            moe_intermediate_size=16,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            head_dim=8,
        ),
        True,
    ),
    "hunyuan_v1_moe": (
        "hunyuan_v1_moe",
        dict(num_experts=8, moe_topk=2, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        True,
    ),
    "lfm2_moe": (
        "lfm2_moe",
        dict(
            num_experts=8,
            **E8,
            num_dense_layers=1,
            use_expert_bias=True,
            layer_types=["conv", "full_attention", "conv"],
        ),
        True,
    ),
    "longcat_flash": (
        "longcat_flash",
        dict(
            num_layers=3,
            num_hidden_layers=6,
            n_routed_experts=8,
            zero_expert_num=2,
            moe_topk=2,
            expert_ffn_hidden_size=16,
            ffn_hidden_size=48,
            head_dim=8,
            **MLA,
        ),
        False,
    ),
    "afmoe": ("afmoe", dict(num_experts=8, **E8, num_shared_experts=1, num_dense_layers=1, head_dim=8), True),
    "dbrx": (
        "dbrx",
        dict(
            d_model=32,
            n_heads=4,
            n_layers=3,
            max_seq_len=128,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={
                "ffn_hidden_size": 16,
                "moe_num_experts": 8,
                "moe_top_k": 2,
                "moe_normalize_expert_weights": 1.0,
            },
        ),
        True,
    ),
}


# -- what real checkpoints vary -------------------------------------------------------------------

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


def build_family(name: str, path: Path, seed: int = 0) -> Path:
    """Row ``name`` of :data:`FAMILIES`, built and saved at ``path`` as its :func:`family_variant`."""
    model_type, overrides, _ = FAMILIES[name]
    variant = family_variant(name)
    model, tok = build_model(model_type, overrides, seed, variant=variant)
    return save_model(model, tok, Path(path), variant)


def build_model(model_type: str, overrides: dict, seed: int = 0, variant: Variant | None = None):
    """A tiny random MoE model of ``model_type`` and the char tokenizer. ``variant`` (default: the family's
    config defaults) sets the head tying and bias flags; :func:`save_model` applies its storage."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    tok = char_tokenizer()
    config = CONFIG_MAPPING[model_type](
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{**COMMON, **overrides, **(variant.config(model_type) if variant else {})},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if variant is not None and variant.bias:
        _trained_biases(model)
    from premoe.moe.arch import find_moe_layers
    from premoe.moe.families import resolve

    spec = resolve({"model_type": model_type})[0]
    with torch.no_grad():
        for m in find_moe_layers(model, spec):
            for path in m.router_tensors:
                t = m.tensor(path)
                if t.dim() == 2 and t.shape[1] == config_hidden(model.config):
                    t.normal_(0, 1.0)  # router rows: decisive routing, as in trained models
                elif path == m.bias_path:
                    t.copy_(torch.randn_like(t) * 0.1)
                elif t.is_floating_point():
                    t.normal_(0, 0.5)  # router biases
    return model, tok


DENSE_FAMILIES: dict[str, dict] = {  # dense model_type -> config overrides (all GQA)
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "olmo2": {},
}


def build_dense_model(
    path: Path, model_type: str, seed: int = 0, variant: Variant = PLAIN, trained_norms: bool = False, **overrides
) -> Path:
    """A tiny random dense decoder of ``model_type`` (GQA: 8 heads over 2 KV heads) saved at ``path`` as
    ``variant`` (default: tied head, one float32 file), with the char tokenizer; biases (and with
    ``trained_norms`` the norm weights) drawn like trained ones so slicing them is exercised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = char_tokenizer()
    cfg = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg.update(variant.config(model_type))
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
            elif trained_norms and "norm" in n:
                p.normal_(0.5, 0.3)
    return save_model(model, tok, Path(path), variant)


def build_dense_family(name: str, path: Path, seed: int = 0) -> Path:
    """Row ``name`` of :data:`DENSE_FAMILIES`, saved at ``path`` as its :func:`dense_variant`, norms drawn
    like trained ones (OLMo-2's q/k norms are sliced with their heads: a slip must show)."""
    return build_dense_model(path, name, seed, dense_variant(name), trained_norms=True, **DENSE_FAMILIES[name])


def config_hidden(config) -> int:
    return getattr(config, "hidden_size", None) or getattr(config, "d_model")


def _trained_biases(model) -> None:
    """Biases the init leaves at zero drawn like trained ones, so a bias that is dropped or mis-sliced shows."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") and p.is_floating_point() and not p.any():
                p.normal_(0, 0.1)


def save_model(model, tok, path: Path, variant: Variant = PLAIN) -> Path:
    """``model`` and ``tok`` saved at ``path`` as ``variant`` stores them. A bf16/fp16 variant is what a model
    loaded with ``from_pretrained(dtype=...)`` and saved again is: what transformers keeps in float32 (DeepSeek's
    router, LFM2's expert bias) stays float32. Sharded: about four safetensors files and an index, as the hub
    writes large models."""
    import tempfile

    from transformers import AutoModelForCausalLM

    shard = {}
    if variant.sharded:
        numel = sum(t.numel() for t in {id(t): t for t in model.state_dict().values()}.values())
        shard["max_shard_size"] = max(numel * getattr(torch, variant.dtype).itemsize // 4, 1)
    if variant.dtype == "float32":
        model.save_pretrained(path, **shard)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            loaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, variant.dtype))
            loaded.save_pretrained(path, **shard)
    tok.save_pretrained(path)
    return path


# -- data and comparisons the tests share ---------------------------------------------------------

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


def quantize_checkpoint(src: Path, out: Path, method: str, block: tuple[int, int] | None = (16, 16)) -> Path:
    """Write ``src`` (a tiny model saved by transformers) as its family's quantised hub release would be:

    * ``fp8`` (DeepSeek-V3, Kimi-K2, Qwen3-FP8, GLM-4.x-FP8): every linear weight matrix (attention, dense
      and shared MLPs, every expert) in float8_e4m3fn with a float32 ``weight_scale_inv`` per ``block``;
      embeddings, LM head, norms and router tensors as they are; ``quantization_config`` added.
    * ``mxfp4`` (GPT-OSS): the fused expert matrices as ``*_blocks`` / ``*_scales`` in the hub's [E, out, in]
      orientation (32 values per E8M0 scale), everything else as it is.
    """
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from premoe.core.quant import FORMATS, Fp8Blocks
    from premoe.moe.model import inspect_model

    if method not in FORMATS:
        raise ValueError(f"unknown quantisation method {method!r}; choose from {', '.join(FORMATS)}")
    fmt = Fp8Blocks(block) if FORMATS[method] is Fp8Blocks else FORMATS[method]()
    info = inspect_model(src)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    done = {}
    for name, t in tensors.items():
        if fmt.quantizes(name, t, info.roles[name]):
            done.update(fmt.encode(name, t, transposed=info.spec.packed_transposed))
        else:
            done[name] = t
    save_file({k: v.contiguous() for k, v in done.items()}, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = fmt.config()
    cfg.setdefault("dtype", "bfloat16")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
