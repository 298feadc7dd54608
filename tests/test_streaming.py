"""Layer-streaming calibration: the same statistics as in memory, one layer held at a time, bounded memory."""

import pytest
import torch

import premoe
from premoe.core.config import load_tokenizer
from premoe.core.data import write_jsonl
from premoe.core.options import RunOptions
from premoe.core.store import PatternStore
from premoe.errors import InputError
from premoe.moe.model import inspect_model
from premoe.moe.observe import Recording, observe_streamed
from premoe.moe.scoring import MarkerParams
from premoe.moe.streaming import HiddenStore, LayerStream, activation_bytes, resident_sizes

ROWS = [{"prompt": f"add {i}+{i + 3}=", "completion": str(2 * i + 3)} for i in range(6)]
ROWS += [{"text": "reverse abc=cba"}, {"text": "sort 321=123"}]
# Decoder layers that hand each other more than hidden states (indexer results, a second residual stream):
# a layer-by-layer run cannot reproduce them, and says so.
STATEFUL = {"hy_v4", "glm_moe_dsa", "inkling2_text"}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / a.abs().clamp_min(1e-6)).max())


def test_hidden_states_spill_to_disk_without_changing_results(family_dir):
    info = inspect_model(family_dir("deepseek_v3"))
    tok = load_tokenizer(info.path)
    texts = [r.get("text") or r["prompt"] + r["completion"] for r in ROWS]
    params = MarkerParams(k=info.router.top_k)
    kept, _ = observe_streamed(info, tok, texts, Recording(params), run=RunOptions(batch_size=2, progress=False))
    spilled, stats = observe_streamed(
        info, tok, texts, Recording(params), run=RunOptions(batch_size=2, progress=False), hidden_budget=0
    )
    assert stats["spilled"] > 0
    for k in kept.sums:
        assert torch.equal(kept.sums[k], spilled.sums[k])


def test_one_layer_is_held_at_a_time(family_dir):
    info = inspect_model(family_dir("qwen3_moe"))
    tok = load_tokenizer(info.path)
    stream = LayerStream(info)
    held = []

    def count(*_):
        held.append(sum(1 for layer in stream.layers if not next(layer.parameters()).is_meta))

    hooks = [layer.register_forward_pre_hook(count) for layer in stream.layers]
    from premoe.core.data import token_batches
    from premoe.moe.streaming import make_batches

    batches = make_batches(token_batches(tok, ["add 1+2=3", "sort 21=12"], 1, 64, False), tok.pad_token_id)
    run = stream.run(batches, hidden_budget=1 << 30, progress=False)
    for h in hooks:
        h.remove()
    assert held and max(held) == 1  # exactly the running layer is in memory
    assert all(next(layer.parameters()).is_meta for layer in stream.layers)  # and freed afterwards
    assert run["largest_layer"] <= resident_sizes(info)["largest_layer"]


def test_hidden_store_round_trip(tmp_path):
    store = HiddenStore(budget=100, directory=str(tmp_path))
    a, b = torch.randn(2, 3, 4), torch.randn(1, 5, 4)
    store.put(0, a)  # 96 bytes: in memory
    store.put(1, b)  # would exceed the budget: on disk
    assert store.spilled == b.nbytes
    assert torch.equal(store.get(0), a) and torch.equal(store.get(1), b)
    store.put(1, b * 2)  # rewritten in place
    assert torch.equal(store.get(1), b * 2)
    store.close()


def test_streaming_is_chosen_when_the_model_does_not_fit(family_dir, tmp_path):
    src = family_dir("mixtral")
    info = inspect_model(src)
    sizes = resident_sizes(info)
    act = activation_bytes(info, 2, 32)
    # room for the largest layer and a batch, not for the whole model
    budget_mb = (sizes["largest_layer"] + act + (sizes["total"] - sizes["largest_layer"]) / 2) / 2**20
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    p = premoe.calibrate(
        src, data, "t", tmp_path / "s", max_memory=budget_mb, batch_size=2, max_length=32, progress=False
    )
    assert PatternStore.open(tmp_path / "s").tasks["t"]["streamed"] is True
    q = premoe.calibrate(src, data, "u", tmp_path / "s", batch_size=2, max_length=32, progress=False)
    assert q.info["streamed"] is False
    assert torch.equal(p.scores, q.scores)


def test_budget_too_small_for_one_layer_fails_before_writing(family_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(InputError, match="too small for even one layer"):
        premoe.calibrate(family_dir("mixtral"), data, "t", tmp_path / "s", max_memory=0.01, stream=True, progress=False)
    with pytest.raises(InputError, match="`max_memory` must be a number > 0"):
        premoe.calibrate(family_dir("mixtral"), data, "t", tmp_path / "s", max_memory=-1, progress=False)
    assert not (tmp_path / "s").exists()


def test_lazy_layers_give_the_same_logits_and_generations(family_dir, tmp_path):
    from premoe.moe.loading import load_model
    from premoe.moe.selective import ByteReader
    from premoe.moe.streaming import lazy_model

    src = family_dir("qwen3_moe")
    lm = load_model(src, device="cpu")
    with ByteReader() as r:
        lazy = lazy_model(lm.info, None, r, budget=0)  # every layer freed as soon as it has run
        ids = lm.tokenizer(["add 1+2=", "sort 321="], return_tensors="pt", padding=True)
        with torch.no_grad():
            a = lm.model(**ids, use_cache=False).logits
            b = lazy(**ids, use_cache=False).logits
        assert torch.equal(a, b)
        ga = lm.model.generate(**ids, max_new_tokens=4, do_sample=False)
        gb = lazy.generate(**ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(ga, gb)
        assert r.bytes_read > lm.info.checkpoint.nbytes  # layers were read again for each forward pass


def test_eval_streams_when_asked_and_agrees(family_dir, tmp_path):
    src = family_dir("mixtral")
    data = write_jsonl(
        tmp_path / "e.jsonl",
        [{"prompt": "add 1+2=", "completion": "3"}, {"prompt": "sort 21=", "choices": ["12", "21"], "answer": 0}],
    )
    a = premoe.evaluate(src, data, progress=False)
    b = premoe.evaluate(src, data, stream=True, max_memory=64, progress=False)
    assert b["streamed"] and b["bytes_read"] > 0
    assert (a["exact_match"], a["mc_accuracy"]) == (b["exact_match"], b["mc_accuracy"])
    premoe.calibrate(src, write_jsonl(tmp_path / "d.jsonl", ROWS), "t", tmp_path / "s", progress=False)
    c = premoe.evaluate(src, data, store=tmp_path / "s", task="t", keep=4, progress=False)
    d = premoe.evaluate(src, data, store=tmp_path / "s", task="t", keep=4, stream=True, progress=False)
    assert d["streamed"] and (c["exact_match"], c["mc_accuracy"]) == (d["exact_match"], d["mc_accuracy"])


def test_streamed_calibration_honours_the_dtype(tmp_path, small_data):
    """``calibrate --stream --dtype float32`` runs the layers in float32 like the in-memory run (it used to run
    them in the checkpoint's bf16 whatever ``dtype`` said)."""
    import premoe
    from premoe.assets import TINY_MODEL
    from premoe.core.store import PatternStore

    for stream in (False, True):
        premoe.calibrate(TINY_MODEL, small_data, "t", tmp_path / f"s{stream}", dtype="float32", stream=stream,
                         progress=False)  # fmt: skip
    a, b = (PatternStore.open(tmp_path / f"s{s}").load("t") for s in (False, True))
    for name in a.means:
        torch.testing.assert_close(a.means[name], b.means[name], rtol=1e-6, atol=1e-9)
