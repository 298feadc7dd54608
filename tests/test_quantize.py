"""``premoe prune --quantize``: GPTQ and round-to-nearest INT4/INT8 (and FP8 blocks) of the kept experts, written
in compressed-tensors format (premoe.core.quant.gptq, premoe.moe.quantize). vLLM's load is in test_vllm.py;
every family row in tests/contract/test_moe_family.py."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import premoe
from premoe.assets import TINY_MODEL
from premoe.core.data import write_jsonl
from premoe.core.quant import CompressedFp8, CompressedPacked
from premoe.core.quant.gptq import gptq, output_error, round_to_nearest
from premoe.core.tasks import samples
from premoe.errors import InputError
from premoe.moe.model import inspect_model
from premoe.testing import FAMILIES, build_model, quantize_checkpoint, save_model


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features (what makes GPTQ's error feedback pay)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g) + 0.1 * torch.randn(
        n, d, generator=g
    )


# -- the rounding itself -------------------------------------------------------------------------------


def test_gptq_with_an_identity_gram_is_round_to_nearest():
    """Uncorrelated unit inputs leave no error to feed forward: GPTQ's codes and scales are RTN's."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    for bits, group in ((4, 16), (4, None), (8, 32)):
        q, s = gptq(w, torch.eye(64, dtype=torch.float64), bits, group, damp=0.0)
        q0, s0 = round_to_nearest(w, bits, group)
        assert torch.equal(q, q0) and torch.equal(s, s0)


def test_gptq_lowers_the_output_error_on_its_inputs_and_batches_exactly():
    torch.manual_seed(0)
    W = torch.randn(3, 16, 64)
    X = [correlated(256, 64, seed) for seed in range(3)]
    H = torch.stack([x.double().T @ x.double() for x in X])
    qb, sb = gptq(W, H, 4, 16)
    for i in range(3):
        q, s = gptq(W[i], H[i], 4, 16)
        assert torch.equal(q, qb[i]) and torch.equal(s, sb[i])  # batched = one at a time
        q0, s0 = round_to_nearest(W[i], 4, 16)
        assert output_error(W[i], q, s, H[i]) < 0.7 * output_error(W[i], q0, s0, H[i])
        lo, hi = -8, 7
        assert int(q.min()) >= lo and int(q.max()) <= hi and s.dtype == torch.bfloat16 and s.shape == (16, 4)


def test_gptq_inputs_never_seen_are_rounded_to_nearest():
    """A zero Gram matrix (an expert no calibration token reached) gives round-to-nearest, not zeros."""
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    q, s = gptq(w, torch.zeros(32, 32, dtype=torch.float64), 4, 16)
    q0, s0 = round_to_nearest(w, 4, 16)
    assert torch.equal(q, q0) and torch.equal(s, s0)
    with pytest.raises(ValueError, match="does not divide"):
        gptq(w, torch.eye(32, dtype=torch.float64), 4, 12)


def test_gptq_onto_the_mxfp4_grid_encodes_exactly_and_lowers_the_output_error():
    """The re-fit's GPTQ rounding of MXFP4 experts: with an identity Gram it is the format's own rounding to
    nearest; with correlated inputs its output error is lower; and encoding the rounded weights (groups whose
    maxima rounded down included) gives back exactly those values, so the export holds what GPTQ chose."""
    from premoe.core.quant import Mxfp4
    from premoe.core.quant.gptq import gptq_on_grid

    fmt = Mxfp4()
    grid = fmt.rounding_grid()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 72, generator=g)  # 72 inputs: two groups of 32 and a short one of 8
    w[0, :32] *= 1e-3  # a quiet group
    w[1, :32] = torch.tensor([0.24, 2.9] * 16)  # a group whose maximum may round down
    nearest = fmt.decode(fmt.encode("weight", w), tuple(w.shape), torch.float32)
    mine, scales = gptq_on_grid(w, torch.eye(72, dtype=torch.float64), grid, grid.group, damp=0.0)
    assert torch.equal(mine, nearest) and scales.shape == (16, 3)
    x = correlated(512, 72)
    H = x.double().T @ x.double()
    rounded, _ = gptq_on_grid(w, H, grid, grid.group)
    assert torch.equal(fmt.decode(fmt.encode("weight", rounded), tuple(w.shape), torch.float32), rounded)
    err = lambda v: float(((w - v).double() @ H * (w - v).double()).sum())  # noqa: E731
    assert err(rounded) < 0.8 * err(nearest)


def test_packed_parts_decode_to_codes_times_scales():
    fmt = CompressedPacked(4, 16)
    w = torch.randn(8, 48)
    q, s = gptq(w, torch.eye(48, dtype=torch.float64) * 3, 4, 16)
    parts = fmt.parts("weight", q, s)
    assert parts["weight_packed"].dtype == torch.int32 and parts["weight_packed"].shape == (8, 6)
    assert parts["weight_shape"].tolist() == [8, 48]
    deq = fmt.decode(parts, (8, 48), torch.float32)
    assert torch.equal(deq, (q.to(torch.bfloat16) * s.repeat_interleave(16, -1)).float())


# -- the export ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantize")
    calib = write_jsonl(d / "add.jsonl", samples("add", 48, "calib"))
    premoe.calibrate(TINY_MODEL, calib, "add", d / "store", progress=False)
    return d


def expert_keys(path):
    with safe_open(next(path.glob("*.safetensors")), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys() if ".experts." in k}


def test_w4a16_export_is_compressed_tensors_with_gptq_codes_and_reads_back(tiny, tmp_path):
    src = inspect_model(TINY_MODEL)
    base = dict(progress=False)
    res = premoe.prune(TINY_MODEL, tiny / "store", "add", 8, tmp_path / "gptq", quantize="w4a16", **base)
    premoe.prune(
        TINY_MODEL, tiny / "store", "add", 8, tmp_path / "rtn", quantize="w4a16", quantize_rounding="rtn", **base
    )
    bf = premoe.prune(TINY_MODEL, tiny / "store", "add", 8, tmp_path / "bf16", **base)
    assert "w4a16 (gptq" in res.summary() and res.bytes_written < 0.6 * bf.bytes_written
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert cfg["premoe"]["quantize"] == {
        "scheme": "w4a16",
        "rounding": "gptq",
        "group_size": 32,
        "format": "compressed-tensors int4 (groups of 32)",
    }
    assert cfg["premoe"]["refit"]["tokens"] > 0  # the default re-fit ran, then the rounding
    keys = expert_keys(tmp_path / "gptq")
    assert keys and all(k.rsplit(".", 1)[1] in ("weight_packed", "weight_scale", "weight_shape") for k in keys)
    assert sum(k.endswith("weight_packed") for k in keys) == 3 * 8 * len(src.moe_layers)
    out = inspect_model(tmp_path / "gptq")
    assert out.num_experts == 8 and isinstance(out.quant, CompressedPacked)
    g, r = inspect_model(tmp_path / "gptq").checkpoint, inspect_model(tmp_path / "rtn").checkpoint
    differ = [k for k in keys if k.endswith("_packed") and not torch.equal(g.tensor(k), r.tensor(k))]
    assert differ  # GPTQ moved codes that round-to-nearest would not
    # the RTN export is exactly the bf16 re-fit export rounded to nearest
    b = inspect_model(tmp_path / "bf16").checkpoint
    name = next(k for k in b.tensors if k.endswith("experts.3.down_proj.weight"))
    parts = CompressedPacked(4, 32).encode("w", b.tensor(name).float())
    assert torch.equal(r.tensor(name + "_packed"), parts["w_packed"])
    # premoe evaluates the export like any compressed-tensors checkpoint
    data = write_jsonl(tmp_path / "eval.jsonl", samples("add", 12, "eval"))
    acc = {d: premoe.evaluate(tmp_path / d, data, progress=False)["exact_match"] for d in ("gptq", "bf16")}
    assert acc["gptq"] >= acc["bf16"] - 0.2


def test_gptq_gram_matrices_are_made_per_batch_and_batches_change_nothing(tiny, tmp_path, monkeypatch):
    """Gram matrices are made when a GPTQ batch needs them (one batch's at a time, not one per expert):
    batches of one matrix give the same export, byte for byte, as the default batches, and then no more than
    one Gram matrix is made between two GPTQ calls."""
    from premoe.core.quant import gptq as gptq_module
    from premoe.moe import quantize

    premoe.prune(TINY_MODEL, tiny / "store", "add", 8, tmp_path / "a", quantize="w4a16", progress=False)
    made, peak = [0], [0]
    real_gram, real_gptq = quantize.ExpertGrams.__call__, gptq_module.gptq

    def counted(self, e, down, n):
        made[0] += 1
        peak[0] = max(peak[0], made[0])
        return real_gram(self, e, down, n)

    def rounded(*args, **kwargs):
        made[0] = 0  # the batch's matrices are dropped once it is rounded
        return real_gptq(*args, **kwargs)

    monkeypatch.setattr(quantize.ExpertGrams, "__call__", counted)
    monkeypatch.setattr(gptq_module, "gptq", rounded)
    monkeypatch.setattr(quantize, "GRAM_BYTES", 1)  # one matrix per batch
    premoe.prune(TINY_MODEL, tiny / "store", "add", 8, tmp_path / "b", quantize="w4a16", progress=False)
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    assert peak[0] == 1


def test_rtn_needs_no_calibration_data_and_gptq_says_it_does(tmp_path):
    calib = write_jsonl(tmp_path / "add.jsonl", samples("add", 24, "calib"))
    premoe.calibrate(TINY_MODEL, calib, "add", tmp_path / "store", progress=False)
    calib.unlink()
    with pytest.raises(InputError, match="quantize_rounding='rtn'") as e:
        premoe.prune(TINY_MODEL, tmp_path / "store", "add", 8, tmp_path / "g", quantize="w4a16", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "g").exists()
    res = premoe.prune(
        TINY_MODEL, tmp_path / "store", "add", 8, tmp_path / "r", quantize="w8a16", quantize_rounding="rtn",
        progress=False,
    )  # fmt: skip
    assert isinstance(inspect_model(tmp_path / "r").quant, CompressedPacked) and res.plan.refit == {
        "skipped": res.plan.refit["skipped"]
    }


def test_fp8_export_is_block_quantised(tiny, tmp_path):
    premoe.prune(TINY_MODEL, tiny / "store", "add", 8, tmp_path / "f", quantize="fp8", progress=False)
    out = inspect_model(tmp_path / "f")
    assert isinstance(out.quant, CompressedFp8) and out.quant.block == (128, 128)
    keys = expert_keys(tmp_path / "f")
    assert {v for k, v in keys.items() if k.endswith(".weight")} == {"F8_E4M3"}
    acts = json.loads((tmp_path / "f" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert acts["group_0"]["input_activations"]["strategy"] == "group"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantize": "w4a16", "quantize_group": 24}, "does not divide"),
        ({"quantize": "fp8", "quantize_rounding": "gptq"}, "fp8 rounds"),
        ({"quantize_rounding": "rtn"}, "need `quantize`"),
        ({"quantize": "w3a16"}, "must be one of"),
    ],
)
def test_impossible_quantize_options_are_refused_before_any_work(tiny, tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        premoe.prune(TINY_MODEL, tiny / "store", "add", 8, tmp_path / "o", progress=False, **kwargs)
    assert not (tmp_path / "o").exists()


def test_fp8_sources_give_int4_experts_and_dequantised_attention(tmp_path, small_data):
    """DeepSeek-V3's FP8 layout to W4A16 (the Kimi-K2-Thinking shape): the kept experts rounded from their
    dequantised values, every other FP8 weight written dequantised (one quantization_config per checkpoint), no
    scale left; the export computes like the FP8 source's own pruned export. FP8 to FP8, and 4-bit sources, are
    refused in one line."""
    mt, ov, _ = FAMILIES["deepseek_v3"]
    src = save_model(*build_model(mt, ov), tmp_path / "src")
    fp8 = quantize_checkpoint(src, tmp_path / "fp8", "fp8")
    premoe.calibrate(fp8, small_data, "t", tmp_path / "s", progress=False)
    premoe.prune(fp8, tmp_path / "s", "t", 4, tmp_path / "w4", quantize="w4a16", quantize_group=16, progress=False)
    premoe.prune(fp8, tmp_path / "s", "t", 4, tmp_path / "same", progress=False)
    out, source = inspect_model(tmp_path / "w4"), inspect_model(fp8)
    assert isinstance(out.quant, CompressedPacked)
    keys = set(out.checkpoint.tensors)
    assert not any(k.endswith(("_scale_inv", "input_scale")) for k in keys)
    attn = next(k for k in keys if k.endswith("self_attn.o_proj.weight"))
    assert source.checkpoint.tensors[attn].dtype == "F8_E4M3" and out.checkpoint.tensors[attn].dtype != "F8_E4M3"
    assert any(k.endswith("experts.0.down_proj.weight_packed") for k in keys)
    a, b = (premoe.evaluate(tmp_path / d, perplexity=small_data, progress=False) for d in ("w4", "same"))
    assert abs(a["perplexity"] / b["perplexity"] - 1) < 0.05
    with pytest.raises(InputError, match="does not apply"):
        premoe.prune(fp8, tmp_path / "s", "t", 4, tmp_path / "o", quantize="fp8", progress=False)
    w4 = quantize_checkpoint(src, tmp_path / "ct", "compressed-tensors/w4g16")
    premoe.calibrate(w4, small_data, "t", tmp_path / "s4", progress=False)
    with pytest.raises(InputError, match="does not apply"):
        premoe.prune(w4, tmp_path / "s4", "t", 4, tmp_path / "o", quantize="w4a16", progress=False)
    assert not (tmp_path / "o").exists()


def test_dense_models_are_refused(tmp_path, small_data):
    from premoe.assets import TINY_DENSE

    premoe.calibrate(TINY_DENSE, small_data, "t", tmp_path / "d", progress=False)
    with pytest.raises(InputError, match="`quantize` does not apply to dense models"):
        premoe.prune(TINY_DENSE, tmp_path / "d", "t", None, tmp_path / "o", sparsity=0.2, quantize="w4a16")


def test_cli_quantize_errors_are_one_line(tiny, tmp_path):
    cmd = [sys.executable, "-m", "premoe", "prune", "--model", str(TINY_MODEL), "--store", str(tiny / "store")]
    cmd += [
        "--task",
        "add",
        "--keep",
        "8",
        "--out",
        str(tmp_path / "o"),
        "--quantize",
        "w4a16",
        "--quantize-group",
        "7",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "--quantize-group 7 does not divide" in p.stderr.strip().splitlines()[-1]
