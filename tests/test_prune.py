"""PEP pruning contract, run for every family in conftest.FAMILIES."""

import json

import pytest
import torch

import premoe
from premoe.errors import InputError, StoreError
from premoe.moe.loading import load_model
from premoe.moe.model import inspect_model
from premoe.moe.surgery import apply_plan_
from premoe.testing import FAMILIES, build_model, save_model

TEXT = "ab"  # 3 tokens with BOS: a few experts per layer


def logits_of(model, tok, text=TEXT):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt"), use_cache=False).logits[0].float()


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
    extra = {
        k.replace("model.layers.2.", "model.layers.3."): v.clone()
        for k, v in sd.items()
        if k.startswith("model.layers.2.")
    }
    save_file({**sd, **extra}, src / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (src / "config.json").write_text(json.dumps(cfg))
    premoe.calibrate(src, small_data, "t", tmp_path / "store", progress=False)
    res = premoe.prune(src, tmp_path / "store", "t", 4, tmp_path / "out", progress=False)
    assert res.dropped and all(k.startswith("model.layers.3.") for k in res.dropped)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
