"""Adapter table: detection, MoE-layer discovery, routing specs, checkpoint key roles."""

import pytest

from premoe.errors import UnsupportedModelError
from premoe.moe.arch import router_spec
from premoe.moe.families import ARCH_SPECS, UNSUPPORTED, resolve, supported_model_types
from premoe.moe.model import inspect_model
from premoe.testing import FAMILIES


def get_spec(model_type):
    return resolve({"model_type": model_type})[0]


def test_every_required_family_is_supported():
    required = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "gpt_oss"}
    assert required <= set(supported_model_types())
    tested = {mt for mt, _, _ in FAMILIES.values()}
    assert {resolve({"model_type": mt})[0].name for mt in tested} == set(
        ARCH_SPECS
    )  # every row has a contract-test model


def test_unknown_family_error_lists_supported():
    with pytest.raises(UnsupportedModelError) as e:
        get_spec("llama")
    for name in ("mixtral", "deepseek_v3", "qwen3_moe", "gpt_oss"):
        assert name in str(e.value)
    assert get_spec("sarvam_moe").name == "glm4_moe"  # transformers runs sarvam_moe with Glm4MoeForCausalLM


def test_unsupported_moe_families_say_why():
    for model_type, why in UNSUPPORTED.items():
        with pytest.raises(UnsupportedModelError, match="cannot prune"):
            get_spec(model_type)
        assert why


def test_model_type_unknown_to_transformers_resolves_through_architectures():
    spec, config_type, text = resolve({"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]})
    assert spec.name == "deepseek_v3" and config_type == "deepseek_v3"


def test_dense_layers_are_not_moe_layers(family_dir):
    assert inspect_model(family_dir("deepseek_v3")).moe_layers == [1, 2]  # first_k_dense_replace=1
    assert inspect_model(family_dir("qwen2_moe")).moe_layers == [0, 2]  # mlp_only_layers=[1]
    assert inspect_model(family_dir("mixtral")).moe_layers == [0, 1, 2]


def test_shared_experts_and_dense_mlps_are_never_routed_keys(family_dir):
    for fam in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):
        info = inspect_model(family_dir(fam))
        for name, role in info.roles.items():
            if "shared_expert" in name or (role.layer is not None and role.layer not in info.moe_layers):
                assert role.kind == "other", name


def test_router_specs_from_config():
    from transformers import CONFIG_MAPPING

    def cfg(mt, **kw):
        return CONFIG_MAPPING[mt](**kw)

    spec = router_spec(
        cfg(
            "deepseek_v3",
            num_experts_per_tok=8,
            n_routed_experts=256,
            n_group=8,
            topk_group=4,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        get_spec("deepseek_v3"),
    )
    assert (spec.score, spec.num_experts, spec.top_k, spec.n_group, spec.topk_group, spec.scale) == (
        "sigmoid",
        256,
        8,
        8,
        4,
        2.5,
    )
    assert spec.group_limited and spec.renormalize
    v2 = router_spec(
        cfg(
            "deepseek_v2",
            num_experts_per_tok=6,
            n_routed_experts=160,
            topk_method="group_limited_greedy",
            n_group=8,
            topk_group=3,
        ),
        get_spec("deepseek_v2"),
    )
    assert v2.group_limited and v2.group_score == "max" and not v2.renormalize
    greedy = router_spec(
        cfg("deepseek_v2", num_experts_per_tok=6, n_routed_experts=64, topk_method="greedy", n_group=1),
        get_spec("deepseek_v2"),
    )
    assert not greedy.group_limited
    q = router_spec(
        cfg("qwen3_moe", num_experts_per_tok=8, num_experts=128, norm_topk_prob=True), get_spec("qwen3_moe")
    )
    assert q.num_experts == 128 and q.renormalize


def test_fused_and_per_expert_layouts_are_recognised(family_dir):
    kinds = {
        fam: {r.kind for r in inspect_model(family_dir(fam)).roles.values()}
        for fam in ("gpt_oss", "granitemoe", "olmoe")
    }
    assert "fused" in kinds["gpt_oss"] and "expert" not in kinds["gpt_oss"]
    assert "fused" in kinds["granitemoe"]
    assert "expert" in kinds["olmoe"] and "fused" not in kinds["olmoe"]


def test_router_hash_is_stable_across_inspections(family_dir):
    """Regression: the hash once read a temporary tensor's freed memory and changed between calls."""
    import gc

    src = family_dir("deepseek_v3")
    first = inspect_model(src).fingerprint.router_sha256
    for _ in range(5):
        gc.collect()
        assert inspect_model(src).fingerprint.router_sha256 == first


def test_per_layer_counts_are_read_when_uniform_and_refused_otherwise():
    spec = get_spec("hunyuan_v1_moe")
    assert router_spec({"num_experts": 8, "moe_topk": [2, 2, 2]}, spec).top_k == 2
    with pytest.raises(UnsupportedModelError, match="different experts per token per layer"):
        router_spec({"num_experts": 8, "moe_topk": [2, 1, 2]}, spec)


def test_selective_build_keeps_what_transformers_keeps_in_float32(tmp_path):
    """A bf16 DeepSeek-V3 checkpoint: transformers loads its router weight and correction bias in float32
    (_keep_in_fp32_modules_strict); premoe's byte-range build gives every tensor the dtype transformers does."""
    import torch
    from transformers import AutoModelForCausalLM

    from premoe.moe.selective import ByteReader
    from premoe.moe.selective import build_model as build_selective
    from premoe.testing import FAMILIES, build_model, save_model

    model_type, overrides, _ = FAMILIES["deepseek_v3"]
    model, tok = build_model(model_type, overrides)
    src = save_model(model.to(torch.bfloat16), tok, tmp_path / "bf16")
    theirs = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).state_dict()
    with ByteReader() as reader:
        ours = build_selective(inspect_model(src), None, reader).state_dict()
    assert {k: v.dtype for k, v in ours.items() if k in theirs} == {k: theirs[k].dtype for k in ours if k in theirs}
    assert any(v.dtype == torch.float32 for k, v in ours.items() if k.endswith("gate.weight"))
