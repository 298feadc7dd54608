"""PEP pruning contract, run for every family in conftest.FAMILIES."""

import json

import pytest
import torch
from safetensors import safe_open

import premoe
from premoe.core.modules import config_get
from premoe.moe.arch import find_moe_layers
from premoe.errors import InputError, StoreError
from premoe.moe.model import inspect_model
from premoe.moe.loading import load_model
from premoe.core.store import PatternStore
from premoe.moe.surgery import apply_plan_

from conftest import FAMILIES, build_model, save_model, write_jsonl

TEXT = "ab"  # 3 tokens with BOS: a few experts per layer


def logits_of(model, tok, text=TEXT):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt"), use_cache=False).logits[0].float()


def hits_per_layer(store, task):
    """Distinct experts the calibration input routed to, per MoE layer."""
    p = PatternStore.open(store).load(task)
    return {layer: (row > 0).nonzero().flatten().tolist() for layer, row in zip(p.layers, p.means["count"])}


def contract_keep(info, hits):
    """The smallest keep count that holds every hit expert (per group for balanced group routing)."""
    r = info.router
    if not r.group_limited:
        return max(len(h) for h in hits.values())
    size = r.num_experts // r.n_group
    per_group = max(sum(1 for e in h if e // size == g) for h in hits.values() for g in range(r.n_group))
    return r.n_group * max(per_group, 2)


def test_exactness_contract(family, family_dir, tmp_path):
    """Calibrate on one input, keep exactly the experts it hits: the pruned model's logits equal the
    original's where the router renormalises over the chosen experts; otherwise they deviate (documented).
    The default re-fit (on that input) keeps what is exact exact, and brings the others closer."""
    src = family_dir(family)
    data = write_jsonl(tmp_path / "one.jsonl", [{"text": TEXT}])
    premoe.calibrate(src, data, "one", tmp_path / "store", progress=False)
    info = inspect_model(src)
    hits = hits_per_layer(tmp_path / "store", "one")
    keep = contract_keep(info, hits)
    assert keep < info.num_experts, "the contract input should not hit every expert"
    res = premoe.prune(src, tmp_path / "store", "one", keep, tmp_path / "out", progress=False)
    premoe.prune(src, tmp_path / "store", "one", keep, tmp_path / "plain", progress=False, refit=False)
    for layer, h in hits.items():
        assert set(h) <= set(res.plan.kept[layer])

    lm = load_model(src, device="cpu")
    before = logits_of(lm.model, lm.tokenizer)
    after, plain = ((lambda m: logits_of(m.model, m.tokenizer))(load_model(tmp_path / d, device="cpu")) for d in ("out", "plain"))
    renormalises = FAMILIES[family][2]
    if renormalises:
        torch.testing.assert_close(plain, before, rtol=1e-5, atol=1e-6)  # float noise only (~1e-8 seen)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)  # the re-fit changes nothing exact
    else:
        # Softmax over all experts without renormalisation: dropping experts shrinks the denominator,
        # so the kept weights grow. Same experts chosen, different mixing weights: a deviation far
        # above float noise (1e-5 to 1e-3 on these tiny models; see bench/exactness.py).
        assert (plain - before).abs().max() > 1e-6
        assert torch.equal(plain.argmax(-1), before.argmax(-1))
        if res.plan.refit and "tokens" in res.plan.refit:  # the re-fit corrects part of the deviation
            assert (after - before).abs().max() < (plain - before).abs().max()


def test_export_layout_and_config(family, family_dir, tmp_path, small_data):
    src = family_dir(family)
    premoe.calibrate(src, small_data, "t", tmp_path / "store", progress=False)
    info = inspect_model(src)
    keep = 4
    res = premoe.prune(src, tmp_path / "store", "t", keep, tmp_path / "out", progress=False, refit=False)
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert config_get(cfg, info.spec.count_key) == keep  # hub-native key
    assert config_get(cfg, info.spec.topk_key) == info.router.top_k
    assert {int(k): v for k, v in cfg["premoe"]["kept_experts"].items()} == res.plan.kept
    assert json.loads((out / "premoe_plan.json").read_text())["kept"] == {str(k): v for k, v in res.plan.kept.items()}
    assert (out / "tokenizer.json").is_file()

    new = inspect_model(out)
    assert new.num_experts == keep and new.moe_layers == info.moe_layers
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        out_keys = set(f.keys())
    src_ckpt = info.checkpoint
    for name, role in info.roles.items():
        kept = res.plan.kept.get(role.layer)
        if role.kind == "other":  # attention, norms, dense layers, shared experts: byte-identical
            assert name in out_keys
            assert torch.equal(new.checkpoint.tensor(name), src_ckpt.tensor(name))
        elif role.kind == "router":  # router rows and biases of the kept experts (and zero-computation slots), in order
            expected = src_ckpt.tensor(name).index_select(role.dim, torch.tensor(info.slots(kept)))
            assert torch.equal(new.checkpoint.tensor(name), expected)
        elif role.kind == "fused":  # row blocks of the kept experts, in order
            ids = info.slots(kept) if role.rows == 0 else kept
            full = src_ckpt.tensor(name)
            expected = full.unflatten(0, (-1, full.shape[0] // (info.router.width if role.rows == 0 else info.num_experts)))
            assert torch.equal(new.checkpoint.tensor(name), expected[ids].flatten(0, 1))
        elif role.kind == "expert" and role.expert in info.slots(kept):
            pos = info.slots(kept).index(role.expert)
            a, b = role.span
            assert torch.equal(new.checkpoint.tensor(f"{name[:a]}{pos}{name[b:]}"), src_ckpt.tensor(name))
    n_router = sum(r.kind == "router" for r in info.roles.values())
    assert n_router >= len(info.moe_layers)  # weight, plus bias / correction bias where the family has them


def test_refit_export_changes_only_kept_down_projections_and_router_rows(family, family_dir, tmp_path, small_data):
    """The default MoE export re-fits the kept experts' down projections and router rows
    (premoe.moe.refit): every other tensor is byte-identical to the plain export, the config records it, and transformers reloads it to
    the same logits as the model premoe builds in memory from the plan and the re-fitted weights.
    Families whose experts cannot be rewritten fall back to the plain slice and say why."""
    from premoe.core.checkpoint import ByteReader
    from premoe.core.data import refit_sources
    from premoe.core.config import load_tokenizer
    from premoe.moe.refit_checkpoint import refit_model
    from premoe.moe.selective import build_model as build_pruned

    src = family_dir(family)
    premoe.calibrate(src, small_data, "t", tmp_path / "store", progress=False)
    info = inspect_model(src)
    res = premoe.prune(src, tmp_path / "store", "t", 4, tmp_path / "fit", progress=False)
    premoe.prune(src, tmp_path / "store", "t", 4, tmp_path / "plain", progress=False, refit=False)
    fit, plain = inspect_model(tmp_path / "fit"), inspect_model(tmp_path / "plain")
    cfg = json.loads((tmp_path / "fit" / "config.json").read_text())["premoe"]
    assert cfg["refit"] == res.plan.refit
    if "skipped" in res.plan.refit:
        assert "`refit=False`" in res.plan.refit["skipped"]
        assert family in ("llama4_text", "longcat_flash", "dbrx"), res.plan.refit
        return
    assert res.plan.refit["tokens"] > 0 and res.plan.refit["data"] == "calibration data of t"
    changed = [n for n in plain.checkpoint.tensors
               if not torch.equal(fit.checkpoint.tensor(n), plain.checkpoint.tensor(n))]
    assert changed and all(fit.roles[n].target.endswith(".down_proj") or fit.roles[n].kind == "router" for n in changed)
    assert any(fit.roles[n].target.endswith(".down_proj") for n in changed)

    st = PatternStore.open(tmp_path / "store")
    sources, about = refit_sources(st.tasks, ["t"], None)
    weights = refit_model(info, res.plan, load_tokenizer(info.path), sources, about=about, progress=False)
    try:
        with ByteReader() as reader:
            mine = build_pruned(info, res.plan, reader, refit=weights)
    finally:
        weights.close()
    reloaded = load_model(tmp_path / "fit", device="cpu")
    torch.testing.assert_close(logits_of(reloaded.model, reloaded.tokenizer), logits_of(mine, reloaded.tokenizer))


def test_in_memory_surgery_matches_export(family, family_dir, tmp_path, small_data):
    src = family_dir(family)
    premoe.calibrate(src, small_data, "t", tmp_path / "store", progress=False)
    plan = premoe.plan(src, tmp_path / "store", "t", 4)
    premoe.prune(src, tmp_path / "store", "t", 4, tmp_path / "out", progress=False, refit=False)
    lm = load_model(src, device="cpu")
    apply_plan_(lm.model, lm.info.spec, plan)
    exported = load_model(tmp_path / "out", device="cpu")
    torch.testing.assert_close(logits_of(lm.model, lm.tokenizer), logits_of(exported.model, exported.tokenizer))
    for m in find_moe_layers(lm.model, lm.info.spec):
        for path, dim in m.router_tensors.items():
            assert m.tensor(path).shape[dim] == len(lm.info.slots([0, 1, 2, 3]))


def test_lower_top_k(family_dir, tmp_path, small_data):
    src = family_dir("qwen3_moe")
    premoe.calibrate(src, small_data, "t", tmp_path / "store", progress=False)
    res = premoe.prune(src, tmp_path / "store", "t", 4, tmp_path / "out", top_k=1, progress=False)
    assert res.plan.top_k == 1
    m = load_model(tmp_path / "out", device="cpu")
    assert m.model.config.num_experts_per_tok == 1
    assert all(layer.router.top_k == 1 for layer in m.layers)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 4


def test_deepseek_v3_group_policies(family_dir, tmp_path, small_data):
    src = family_dir("deepseek_v3")  # 8 experts in 2 groups, 1 group per token, top-2
    premoe.calibrate(src, small_data, "t", tmp_path / "store", progress=False)
    bal = premoe.prune(src, tmp_path / "store", "t", 4, tmp_path / "bal", progress=False)
    for kept in bal.plan.kept.values():  # two per group of four
        assert sum(e < 4 for e in kept) == 2 and sum(e >= 4 for e in kept) == 2
    cfg = json.loads((tmp_path / "bal" / "config.json").read_text())
    assert (cfg["n_group"], cfg["topk_group"]) == (2, 1)
    flat = premoe.prune(src, tmp_path / "store", "t", 3, tmp_path / "flat", group_policy="flatten", progress=False)
    cfg = json.loads((tmp_path / "flat" / "config.json").read_text())
    assert (cfg["n_group"], cfg["topk_group"], cfg["n_routed_experts"]) == (1, 1, 3)
    assert flat.plan.group_policy == "flatten"
    load_model(tmp_path / "flat", device="cpu")
    with pytest.raises(InputError, match="multiple of 2"):
        premoe.prune(src, tmp_path / "store", "t", 3, tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="keep at least 4"):
        premoe.prune(src, tmp_path / "store", "t", 2, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep=1), "below the 2 experts"),
        (dict(keep=9), "exceeds the model's 8 experts"),
        (dict(keep=4, top_k=3), "can only be lowered"),
        (dict(keep=4, task="nope"), "not in store"),
    ],
)
def test_bad_prune_requests_fail_before_writing(family_dir, tmp_path, small_data, kwargs, match):
    src = family_dir("mixtral")
    premoe.calibrate(src, small_data, "t", tmp_path / "store", progress=False)
    args = dict(task="t") | kwargs
    with pytest.raises((InputError, StoreError), match=match):
        premoe.prune(src, tmp_path / "store", out=tmp_path / "out", progress=False, **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "store"]  # nothing half-written


def test_out_dir_exists_or_inside_model(family_dir, tmp_path, small_data):
    src = family_dir("mixtral")
    premoe.calibrate(src, small_data, "t", tmp_path / "store", progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        premoe.prune(src, tmp_path / "store", "t", 4, tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="inside the source model"):
        premoe.prune(src, tmp_path / "store", "t", 4, src / "pruned", progress=False)
    res = premoe.prune(src, tmp_path / "store", "t", 4, tmp_path / "out", overwrite=True, progress=False)
    assert (res.out / "config.json").is_file()


def test_sharded_source_and_output(tmp_path, small_data):
    model, tok = build_model(*FAMILIES["qwen2_moe"][:2])
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="100KB")
    tok.save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    premoe.calibrate(src, small_data, "t", tmp_path / "store", progress=False)
    info = inspect_model(src)
    plan = premoe.plan(info, tmp_path / "store", "t", 4)
    from premoe.moe.export import export_pruned

    res = export_pruned(info, plan, tmp_path / "out", max_shard_bytes=60_000, progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == res.bytes_written
    lm = load_model(src, device="cpu")
    apply_plan_(lm.model, lm.info.spec, plan)
    out = load_model(tmp_path / "out", device="cpu")
    torch.testing.assert_close(logits_of(out.model, out.tokenizer), logits_of(lm.model, lm.tokenizer))


def test_layers_past_num_hidden_layers_are_dropped(tmp_path, small_data):
    """DeepSeek-V3 checkpoints carry an MTP layer (model.layers.61) that transformers ignores."""
    from safetensors.torch import load_file, save_file

    model, tok = build_model(*FAMILIES["deepseek_v3"][:2])
    src = save_model(model, tok, tmp_path / "src")
    sd = load_file(src / "model.safetensors")
    extra = {k.replace("model.layers.2.", "model.layers.3."): v.clone() for k, v in sd.items() if k.startswith("model.layers.2.")}
    save_file({**sd, **extra}, src / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    premoe.calibrate(src, small_data, "t", tmp_path / "store", progress=False)
    res = premoe.prune(src, tmp_path / "store", "t", 4, tmp_path / "out", progress=False)
    assert res.dropped and all(k.startswith("model.layers.3.") for k in res.dropped)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
