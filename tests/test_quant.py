"""Quantised checkpoints (block-scaled FP8, MXFP4) in their hub layouts: read, calibrated, pruned and
written back in the original format, bit for bit."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import premoe
from premoe.core.data import write_jsonl
from premoe.core.evaluation import generate_greedy
from premoe.core.quant import dequant_fp8, dequant_mxfp4, quantize_fp8, quantize_mxfp4
from premoe.errors import CheckpointError, UnsupportedModelError
from premoe.moe.held import dequantized_state, held_bytes
from premoe.moe.loading import load_model
from premoe.moe.model import inspect_model
from premoe.moe.selective import ByteReader
from premoe.moe.selective import build_model as build_selective
from premoe.moe.server import TaskServer
from premoe.moe.streaming import resident_sizes
from premoe.moe.surgery import apply_plan_
from premoe.testing import FAMILIES, build_model, quantize_checkpoint, save_model

ROWS = [{"prompt": f"add {i}+{i + 3}=", "completion": str(2 * i + 3)} for i in range(6)] + [{"text": "sort 321=123"}]
# (family, format, config overrides): FP8 as DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8 and GLM-4.x-FP8 publish it,
# MXFP4 as GPT-OSS does (its matrices need multiples of 32).
CASES = {
    "deepseek_v3-fp8": ("deepseek_v3", "fp8", {}),
    "qwen3_moe-fp8": ("qwen3_moe", "fp8", {}),
    "glm4_moe-fp8": ("glm4_moe", "fp8", {}),
    "gpt_oss-mxfp4": ("gpt_oss", "mxfp4", {"intermediate_size": 64}),
    # llm-compressor's compressed-tensors FP8 (Qwen3 / GLM FP8 releases): per output channel, and in blocks
    "qwen3_moe-ct-channel": ("qwen3_moe", "compressed-tensors/channel", {}),
    "glm4_moe-ct-block": ("glm4_moe", "compressed-tensors/block", {}),
    # compressed-tensors pack-quantized W4A16 experts (Kimi-K2-Thinking's release), groups of 16 inputs
    "deepseek_v3-ct-w4a16": ("deepseek_v3", "compressed-tensors/w4g16", {}),
    # ... and asymmetric, with packed zero points (llm-compressor's W4A16_ASYM), per channel on Qwen3-MoE
    "qwen3_moe-ct-w4a16-asym": ("qwen3_moe", "compressed-tensors/w4a", {}),
    # NVFP4 experts (FP8 scales per 16 values, a global scale per tensor), through compressed-tensors and in
    # ModelOpt's own layout (NVIDIA's FP4 releases)
    "glm4_moe-ct-nvfp4": ("glm4_moe", "compressed-tensors/nvfp4", {}),
    "qwen3_moe-modelopt-nvfp4": ("qwen3_moe", "modelopt", {}),
}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            fam, method, extra = CASES[case]
            mt, ov, _ = FAMILIES[fam]
            d = tmp_path_factory.mktemp(case)
            src = save_model(*build_model(mt, {**ov, **extra}), d / "src")
            cache[case] = quantize_checkpoint(src, d / "q", method)
        return cache[case]

    return get


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param


def raw_bytes(path, key) -> bytes:
    with safe_open(path, "pt") as f:
        t = f.get_tensor(key)
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# -- the formats themselves ---------------------------------------------------------------------


def test_fp8_block_dequant_follows_the_block_grid_even_when_blocks_do_not_divide():
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    q, s = quantize_fp8(w, (16, 16))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (math.ceil(40 / 16), math.ceil(24 / 16))
    ref = torch.empty(40, 24)
    for i in range(40):
        for j in range(24):
            ref[i, j] = q[i, j].float() * s[i // 16, j // 16]
    assert torch.equal(dequant_fp8(q, s, (16, 16), torch.float32), ref)
    assert (dequant_fp8(q, s, (16, 16), torch.float32) - w).abs().max() < 0.1 * w.abs().max()


def test_fp8_dequant_matches_transformers_where_blocks_divide():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    w = torch.randn(2, 32, 48)
    q, s = quantize_fp8(w, (16, 16))
    theirs = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.bfloat16)
    assert torch.equal(dequant_fp8(q, s, (16, 16), torch.bfloat16), theirs)


def test_mxfp4_round_trip_and_transformers_agreement():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = torch.randn(3, 8, 64)
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 8, 2, 16) and scales.shape == (3, 8, 2) and blocks.dtype == torch.uint8
    mine = dequant_mxfp4(blocks, scales, torch.bfloat16)
    assert torch.equal(mine.transpose(1, 2), convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
    assert (mine.float() - w).abs().max() <= w.abs().max() / 3  # FP4: coarse, but the right values


def test_fp8_quantiser_follows_vllm_block_rounding_by_hand():
    """pad to whole blocks, amax clamped to >= 1e-4, scale = amax / 448, values times 1 / scale, nearest even."""
    w = torch.tensor([[1.0, -2.0, 17.0], [0.5, 4.0, 19.0], [0.0, 0.0, 448.0]])
    q, s = quantize_fp8(w, (2, 2))  # 3x3 in 2x2 blocks: a 2x2 grid of scales, the last row and column padded
    assert q.shape == (3, 3) and s.shape == (2, 2) and s.dtype == torch.float32
    assert s[0, 0] == torch.tensor(4.0) / 448  # block [[1, -2], [0.5, 4]]: amax 4
    assert q[:2, :2].float().tolist() == [[112.0, -224.0], [56.0, 448.0]]  # x * 112, all exact in e4m3
    assert s[0, 1] == torch.tensor(19.0) / 448 and s[1, 1] == 1.0  # padding never raises a block's amax
    assert s[1, 0] == torch.tensor(1e-4) / 448 and q[2, :2].float().tolist() == [0.0, 0.0]  # all-zero block
    ties = quantize_fp8(torch.tensor([[448.0, 17.0, 19.0, 25.0]]), (1, 4))[0].float()
    assert ties.tolist() == [[448.0, 16.0, 20.0, 24.0]]  # 17, 19, 25 are ties between e4m3 codes: to even
    q, s = quantize_fp8(torch.tensor([[3.0, 1.0, -0.75]]), (1, 3), ue8m0=True)
    assert s.item() == 2.0**-7 and q.float().tolist() == [[384.0, 128.0, -96.0]]  # 3/448 rounded up to 2^-7
    q, s = quantize_fp8(torch.tensor([[2.0, -1.0], [0.5, 0.25]]), None)
    assert s.shape == (1,) and s[0] == torch.tensor(2.0) / 448 and q.float()[0, 0] == 448.0


def test_pow2_ceil_is_exact_and_e8m0_scales_store_as_exponents():
    from premoe.core.quant.fp8 import encode_scale, pow2_ceil

    x = torch.tensor([1.0, 1.0000001, 0.75, 3.0 / 448, 2.0**-130])
    assert pow2_ceil(x).tolist() == [1.0, 2.0, 1.0, 2.0**-7, 2.0**-126]  # just above a power: the next one
    assert encode_scale(torch.tensor([1.0, 0.5, 2.0**-7]), torch.uint8).tolist() == [127, 126, 120]
    with pytest.raises(ValueError, match="powers of two"):
        encode_scale(torch.tensor([0.3]), torch.uint8)


def test_mxfp4_quantiser_follows_openai_by_hand():
    """bf16 first; scale = max|x| / 6 rounded up to a power of two; nearest FP4, ties away from zero."""
    from premoe.core.quant.mxfp4 import FP4_VALUES

    def codes(blocks):
        return torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)

    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.1, 0.2, -5.0, 0.0]
    w = torch.tensor(ties + [0.0] * 20)
    blocks, scales = quantize_mxfp4(w)  # amax 6: scale 6 / 6 = 1, exactly a power of two
    assert blocks.shape == (1, 16) and scales.tolist() == [127]
    got = [FP4_VALUES[c] for c in codes(blocks)[0, :12].tolist()]
    assert got == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0, -0.0, 0.0, -6.0, 0.0]  # every tie away from zero
    assert codes(blocks)[0, 8] == 8  # a negative value that rounds to zero keeps its sign bit
    assert blocks[0, 0] == (2 << 4) | 1  # low nibble first: element 0 (0.5 -> code 1), element 1 (1.0 -> 2)
    blocks, scales = quantize_mxfp4(torch.tensor([7.0, 3.5 * 2] + [0.0] * 30))
    assert scales.tolist() == [128]  # 7 / 6 rounds up to 2: 7 / 2 = 3.5 is a tie, to 4
    assert [FP4_VALUES[c] for c in codes(blocks)[0, :2].tolist()] == [4.0, 4.0]
    blocks, _ = quantize_mxfp4(torch.tensor([6.0, 1.2499999] + [0.0] * 30))
    assert FP4_VALUES[codes(blocks)[0, 1]] == 1.5  # bf16(1.2499999) == 1.25, a tie: 1.5 (not 1.0)
    blocks, scales = quantize_mxfp4(torch.zeros(2, 40))  # 40 columns: two groups, the second zero-padded
    assert blocks.shape == (2, 2, 16) and scales.shape == (2, 2) and not scales.any() and not blocks.any()
    w = torch.randn(3, 40)
    back = dequant_mxfp4(*quantize_mxfp4(w), torch.float32)[..., :40]
    assert (back - w).abs().max() <= w.abs().max() / 3


def test_nvfp4_quantiser_follows_compressed_tensors_by_hand_and_byte_for_byte():
    """global = 448 x 6 / max|w|; per 16 inputs an e4m3 scale of max|x| / 6 x global (zero -> 0.125); values
    x / (scale / global), nearest FP4, ties to even; and the bytes compressed-tensors' own quantiser writes."""
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    from premoe.core.quant.mxfp4 import FP4_VALUES
    from premoe.core.quant.nvfp4 import quantize_nvfp4

    def values(packed):
        return [FP4_VALUES[c] for c in torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).tolist()]

    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -5.0, 5.5, 0.1, 4.5, 2.9, 0.0]
    packed, scale, glob = quantize_nvfp4(torch.tensor([ties, [0.0] * 16]))  # amax 6: global 448, scale 448
    assert glob.tolist() == [448.0] and scale.float().tolist() == [[448.0], [0.125]]  # a zero group: 0.125
    assert values(packed[0]) == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -1.0, -4.0, 6.0, 0.0, 4.0, 3.0, 0.0]
    assert values(packed[1]) == [0.0] * 16 and packed[0, 0] == (2 << 4) | 0  # low nibble first
    packed, scale, glob = quantize_nvfp4(torch.tensor([[3.0] + [1.0] * 15, [12.0] + [0.0] * 15]))
    assert glob.item() == 448 * 6 / 12 and scale.float().flatten().tolist() == [112.0, 448.0]  # 3/6x224, 12/6x224
    assert values(packed[0])[:2] == [6.0, 2.0] and values(packed[1])[0] == 6.0  # 3 / (112 / 224) = 6, 1 -> 2
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(torch.zeros(2, 24))
    args = QuantizationArgs(
        num_bits=4,
        type="float",
        strategy="tensor_group",
        group_size=16,
        symmetric=True,
        scale_dtype=torch.float8_e4m3fn,
    )
    torch.manual_seed(0)
    for spread in (0.5, 10.0, 1e3):
        w = torch.randn(8, 64) * spread
        w[1, :16] = 0
        gs = generate_gparam(w.amin(), w.amax())
        g = w.unflatten(-1, (-1, 16))
        ct_scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gs)
        ct_packed = pack_fp4_to_uint8(quantize(w, ct_scale, zp, args, global_scale=gs))
        packed, scale, glob = quantize_nvfp4(w)
        assert torch.equal(glob, gs.reshape(1)) and torch.equal(scale.float(), ct_scale.float())
        assert torch.equal(packed, ct_packed)


def test_int_packing_matches_compressed_tensors_and_scales_follow_its_rule():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    from premoe.core.quant import CompressedPacked

    torch.manual_seed(0)
    for bits, cols in ((4, 40), (4, 37), (8, 22)):
        fmt = CompressedPacked(bits, None)
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (3, cols), dtype=torch.int8)
        packed = fmt.pack(q)
        assert torch.equal(packed, pack_to_int32(q, bits))  # bit for bit, columns not a whole word too
        assert torch.equal(fmt.unpack(packed)[:, :cols].to(torch.int8), q)
    fmt = CompressedPacked(4, 16)
    w = torch.randn(4, 32)
    w[1, :16] = 0.0  # an all-zero group: bf16's eps as its scale, as compressed-tensors does
    parts = fmt.encode("weight", w)
    scale = parts["weight_scale"]
    assert scale.dtype == torch.bfloat16 and scale.shape == (4, 2) and scale[1, 0] == torch.finfo(torch.bfloat16).eps
    args = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=16, symmetric=True)
    theirs = quantize(w, scale, torch.zeros_like(scale), args, dtype=torch.int8)
    assert torch.equal(fmt.unpack(parts["weight_packed"])[:, :32].to(torch.int8), theirs)
    assert parts["weight_shape"].tolist() == [4, 32]
    with pytest.raises(ValueError, match="does not divide"):
        CompressedPacked(4, 12).encode("weight", w)


def test_asymmetric_zero_points_match_compressed_tensors():
    """W4A16_ASYM: zero points packed along the rows as compressed-tensors packs them, our integers what its
    ``quantize`` gives with our scales and zero points, and our dequantised values what its ``dequantize`` gives."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    from premoe.core.quant import CompressedPacked

    torch.manual_seed(1)
    for group, rows in ((16, 12), (None, 9)):  # rows not a whole word of zero points too
        fmt = CompressedPacked(4, group, symmetric=False)
        w = torch.randn(rows, 32) + 0.5  # skewed: the zero points are not all the middle of the range
        w[2] = torch.rand(32)  # all positive: the minimum widened to 0
        parts = fmt.encode("weight", w)
        groups = 32 // group if group else 1
        assert parts["weight_zero_point"].dtype == torch.int32 and parts["weight_zero_point"].shape == (2, groups)
        zero = unpack_from_int32(parts["weight_zero_point"], 4, torch.Size([rows, groups]), packed_dim=0)
        assert torch.equal(pack_to_int32(zero, 4, packed_dim=0), parts["weight_zero_point"])
        scale = parts["weight_scale"]
        strategy = "group" if group else "channel"
        args = QuantizationArgs(num_bits=4, type="int", strategy=strategy, group_size=group, symmetric=False)
        q = quantize(w, scale, zero, args, dtype=torch.int8)
        assert torch.equal(fmt.unpack(parts["weight_packed"])[:, :32].to(torch.int8), q)
        theirs = dequantize(q, scale, zero, args=args, dtype=torch.float32)
        ours = fmt.decode(parts, (rows, 32), torch.float32)
        assert torch.equal(ours, theirs)
        assert float((ours - w).abs().max()) <= float(scale.float().max())  # half a step, plus bf16 scale rounding


def test_decode_inverts_encode_in_memory_orientation():
    from premoe.core.quant import Fp8Blocks, Mxfp4

    w = torch.randn(48, 40)
    for fmt, transposed in ((Fp8Blocks((16, 16)), False), (Fp8Blocks((16, 16)), True), (Mxfp4(), True)):
        parts = fmt.encode("w", w, transposed=transposed)
        back = fmt.decode(parts, tuple(w.shape), torch.float32, transposed)
        assert back.shape == w.shape and (back - w).abs().max() <= w.abs().max() / 3
        assert torch.equal(
            fmt.decode(fmt.encode("w", back, transposed=transposed), w.shape, torch.float32, transposed), back
        )  # quantising what was decoded changes nothing


# -- end to end, per format ---------------------------------------------------------------------


def test_quantized_checkpoint_is_read_as_transformers_dequantises_it(case, quantized):
    """Read as the reference reads it: transformers' loader for FP8 and MXFP4, compressed-tensors' own
    ``dequantize`` for its checkpoints (transformers keeps those compressed, and cannot fuse their experts)."""
    from transformers import AutoModelForCausalLM

    q = quantized(case)
    info = inspect_model(q)
    assert info.quant.method == CASES[case][1].split("/")[0]
    assert any(r.companion == "scale" for r in info.roles.values())
    if info.quant.method in ("compressed-tensors", "modelopt"):
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        fmt = info.quant
        if fmt.dequant_companions == ("global",):  # NVFP4: fp4 x (scale / global scale); ModelOpt's scale_2 = 1/global
            from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

            args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16)
            checked = 0
            modelopt = info.quant.method == "modelopt"
            for name, role in info.roles.items():
                if role.companion == "global":
                    main = fmt.companion(name)[0]
                    value, stored = info.checkpoint.tensor(main), info.checkpoint.tensor(name)
                    glob = 1.0 / stored.reshape(1) if modelopt else stored
                    scale = info.checkpoint.tensor(
                        main + "_scale" if modelopt else main.removesuffix("_packed") + "_scale"
                    )
                    m, n = value.shape
                    q = unpack_fp4_from_uint8(value, m, n * 2, dtype=torch.float32)
                    theirs = dequantize(q, scale.to(torch.float32), args=args, dtype=torch.float32, global_scale=glob)
                    assert torch.equal(fmt.dequant(value, (scale, stored), torch.float32), theirs), main
                    checked += 1
            assert checked
            return
        if hasattr(fmt, "bits"):  # pack-quantized
            strategy = "group" if fmt.group else "channel"
            args = QuantizationArgs(num_bits=fmt.bits, type="int", strategy=strategy, group_size=fmt.group)
        else:
            block = list(fmt.block) if fmt.block else None
            args = QuantizationArgs(num_bits=8, type="float", strategy=fmt.strategy, block_structure=block)
        checked = 0
        for name, role in info.roles.items():
            if role.companion == "scale":
                main = fmt.companion(name)[0]
                value, scale = info.checkpoint.tensor(main), info.checkpoint.tensor(name)
                if value.dtype == torch.int32:
                    shape = info.checkpoint.tensor(name.removesuffix("_scale") + "_shape").tolist()
                    unpacked = unpack_from_int32(value, fmt.bits, torch.Size(shape))
                    assert torch.equal(fmt.unpack(value)[..., : shape[-1]].to(torch.int8), unpacked)
                    theirs = dequantize(unpacked, scale, args=args, dtype=torch.float32)
                    assert torch.equal(fmt.dequant(value, scale, torch.float32)[..., : shape[-1]], theirs), main
                else:
                    theirs = dequantize(value, scale, args=args, dtype=torch.float32)
                    assert torch.equal(fmt.dequant(value, scale, torch.float32), theirs), main
                checked += 1
        assert checked
        return
    ours = load_model(q, device="cpu").model.state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(q).state_dict()
    block = getattr(info.quant, "block", None)  # FP8 only
    for k, v in ours.items():
        divides = block is None or v.dim() < 2 or (v.shape[-2] % block[0] == 0 and v.shape[-1] % block[1] == 0)
        if divides:  # transformers derives blocks from the scale grid, so it only agrees where blocks divide
            assert torch.equal(v.float(), theirs[k].float()), k


def test_quantized_calibration_streamed_equals_in_memory(case, quantized, tmp_path):
    q = quantized(case)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a = premoe.calibrate(q, data, "a", tmp_path / "s", stream=False, all_stats=True, progress=False)
    b = premoe.calibrate(q, data, "b", tmp_path / "s", stream=True, all_stats=True, progress=False)
    for k in a.means:
        torch.testing.assert_close(a.means[k], b.means[k], rtol=1e-4, atol=1e-7)


def test_export_keeps_the_format_and_every_kept_expert_bit_for_bit(case, quantized, tmp_path):
    q = quantized(case)
    info = inspect_model(q)
    premoe.calibrate(q, write_jsonl(tmp_path / "d.jsonl", ROWS), "t", tmp_path / "s", progress=False)
    res = premoe.prune(q, tmp_path / "s", "t", 4, tmp_path / "out", progress=False, refit=False)  # + reload check
    out = tmp_path / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == info.raw_config["quantization_config"]
    new = inspect_model(out)
    assert new.quant == info.quant and new.num_experts == 4
    src_file, out_file = info.checkpoint.files[0], out / "model.safetensors"
    with safe_open(out_file, "pt") as f:
        out_dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    checked = 0
    for name, role in info.roles.items():
        kept = res.plan.kept.get(role.layer)
        if role.kind == "expert" and role.expert in kept:
            a, b = role.span
            new_name = f"{name[:a]}{kept.index(role.expert)}{name[b:]}"
            assert raw_bytes(out_file, new_name) == raw_bytes(src_file, name)  # FP8 values and their scales
            assert out_dtypes[new_name] == info.checkpoint.tensors[name].dtype.replace("F8_E4M3", "F8_E4M3")
            checked += 1
        elif role.kind == "fused":  # MXFP4 blocks and scales, sliced in lockstep
            src = load_file(src_file)[name]
            per = src.shape[0] // info.num_experts
            expected = src.unflatten(0, (-1, per))[kept].flatten(0, 1)
            assert raw_bytes(out_file, name) == expected.contiguous().view(torch.uint8).numpy().tobytes()
            checked += 1
    assert checked
    # dequantised, the kept experts of the export are exactly the source's kept experts
    with ByteReader() as r:
        full = build_selective(info, None, r)
        pruned = build_selective(new, None, r)
    apply_plan_(full, info.spec, res.plan)
    sa, sb = full.state_dict(), pruned.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_refit_is_written_in_the_checkpoint_format_and_is_what_premoe_computes_with(case, quantized, tmp_path):
    """The default prune re-fits quantised checkpoints too: the re-fitted down projections are written in the
    checkpoint's own format (dtypes, scale shapes, quantization_config), every other kept tensor byte for byte,
    and the export, dequantised, is exactly the model premoe evaluates and serves with that re-fit."""
    from premoe.core.options import RefitOptions
    from premoe.moe.refit_checkpoint import down_targets, refit_for

    q = quantized(case)
    info = inspect_model(q)
    premoe.calibrate(q, write_jsonl(tmp_path / "d.jsonl", ROWS * 4), "t", tmp_path / "s", progress=False)
    res = premoe.prune(q, tmp_path / "s", "t", 4, tmp_path / "out", progress=False)
    assert "tokens" in res.plan.refit and "skipped" not in res.plan.refit
    out = tmp_path / "out"
    new = inspect_model(out)
    assert (
        new.quant == info.quant
        and json.loads((out / "config.json").read_text())["quantization_config"]
        == (info.raw_config["quantization_config"])
    )
    src_file, out_file = info.checkpoint.files[0], out / "model.safetensors"
    with safe_open(out_file, "pt") as f:
        got = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    downs, changed, same = set(down_targets(info).values()), 0, 0
    for name, role in info.roles.items():
        kept = res.plan.kept.get(role.layer)
        if role.kind != "expert" or role.expert not in kept:
            continue
        a, b = role.span
        new_name = f"{name[:a]}{kept.index(role.expert)}{name[b:]}"
        t = info.checkpoint.tensors[name]
        assert got[new_name] == (t.dtype, tuple(t.shape))  # FP8 stays FP8, scales keep their grid
        if role.target in downs and role.companion in (None, "scale", "zero", "global"):  # re-fitted, re-quantised
            changed += raw_bytes(out_file, new_name) != raw_bytes(src_file, name)
        else:
            same += 1
            assert raw_bytes(out_file, new_name) == raw_bytes(src_file, name)
    for name, role in info.roles.items():  # fused experts (MXFP4): same dtypes, kept rows' shapes
        if role.kind == "fused":
            t = info.checkpoint.tensors[name]
            assert got[name][0] == t.dtype and got[name][1][1:] == tuple(t.shape[1:])
            if role.target in downs and role.companion is None:
                src = load_file(src_file)[name]
                kept = src.unflatten(0, (info.num_experts, -1))[res.plan.kept[role.layer]].flatten(0, 1)
                changed += raw_bytes(out_file, name) != kept.contiguous().view(torch.uint8).numpy().tobytes()
    assert changed
    weights = refit_for(info, tmp_path / "s", res.plan, "t", False, RefitOptions(), progress=False)
    with ByteReader() as r:
        ours = build_selective(info, res.plan, r, refit=weights)
        theirs = build_selective(new, None, r)
    sa, sb = ours.state_dict(), theirs.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]


def test_quantized_refit_streamed_matches_the_in_memory_one(quantized, tmp_path):
    """A quantised model larger than memory is re-fitted one decoder layer at a time: the same re-fit, stored
    in the checkpoint's format either way (equal up to one FP8 step where float rounding differs)."""
    from premoe.core.config import load_tokenizer
    from premoe.core.options import RunOptions
    from premoe.moe.refit_checkpoint import refit_model
    from premoe.verbs.prune import plan as make_plan

    q = quantized("deepseek_v3-fp8")
    premoe.calibrate(q, write_jsonl(tmp_path / "d.jsonl", ROWS * 4), "t", tmp_path / "s", progress=False)
    info = inspect_model(q)
    plan = make_plan(info, tmp_path / "s", "t", 4)
    texts, tok = [[r.get("text") or r["prompt"] + r["completion"] for r in ROWS]], load_tokenizer(q)
    run = RunOptions(device="cpu", progress=False)
    whole = refit_model(info, plan, tok, texts, run=run, stream=False)
    layered = refit_model(info, plan, tok, texts, run=run, stream=True)
    try:
        assert whole.experts == layered.experts and whole.experts
        for layer, experts in whole.experts.items():
            for e in experts:
                parts = whole.encoded(layer, e)
                assert parts["weight"].dtype == torch.float8_e4m3fn and parts["weight_scale_inv"].dtype == torch.float32
                torch.testing.assert_close(layered.get(layer, e), whole.get(layer, e), rtol=0.13, atol=1e-3)
    finally:
        whole.close()
        layered.close()


def test_quantized_selective_loading_and_switching(case, quantized, tmp_path):
    q = quantized(case)
    premoe.calibrate(q, write_jsonl(tmp_path / "a.jsonl", ROWS[:4]), "a", tmp_path / "s", progress=False)
    premoe.calibrate(q, write_jsonl(tmp_path / "b.jsonl", ROWS[4:]), "b", tmp_path / "s", progress=False)
    server = TaskServer(q, tmp_path / "s", 4)
    server.load("a")
    server.load("b")
    with ByteReader() as r:
        fresh = build_selective(server.info, server.plan_for("b"), r)
    # the server holds the experts as stored (FP8, MXFP4, INT4 with zero points, NVFP4 with global scales),
    # dequantised one at a time: the same values
    assert held_bytes(server.model) > 0
    sa, sb = dequantized_state(server.model), fresh.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    resident = sum(t.nbytes for t in server.model.state_dict().values()) + held_bytes(server.model)
    assert resident < sum(t.nbytes for t in sb.values())
    # the memory planner's size of the pruned model, dequantised, is what the build holds
    assert resident_sizes(server.info, plan=server.plan_for("b"))["total"] == sum(t.nbytes for t in sb.values())
    reply = server.generate("add 2+5=", max_new_tokens=3)  # answered by a fresh build of the task it routed to
    with ByteReader() as r:
        routed = build_selective(server.info, server.plan_for(reply.task), r)
    assert reply.switched == (reply.task != "b")
    assert reply.text == generate_greedy(routed, server.tokenizer, ["add 2+5="], 3)[0]
    premoe.calibrate(
        q,
        write_jsonl(tmp_path / "c.jsonl", [{"prompt": "sort 43=", "completion": "34"}]),
        "c",
        tmp_path / "s",
        progress=False,
    )
    results, nbytes = premoe.route(q, tmp_path / "s", ["sort 43="])  # a task's own calibration prompt
    assert results[0].task == "c" and results[0].distance < 1e-4 and nbytes > 0
    with ByteReader() as r:
        pruned = build_selective(server.info, premoe.plan(q, tmp_path / "s", "a", 4), r)
    prompts = [row["prompt"] for row in ROWS[:3]]
    answers = generate_greedy(pruned, server.tokenizer, prompts, 3)
    data = write_jsonl(tmp_path / "e.jsonl", [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)])
    res = premoe.evaluate(
        q, data, store=tmp_path / "s", task="a", keep=4, max_new_tokens=3, progress=False, refit=False
    )
    assert res["generate_samples"] == 3 and res["exact_match"] == 1.0  # the same pruned model, built by eval


def test_held_experts_switch_with_stored_refits_and_match_fresh_builds(case, quantized, tmp_path):
    """Served as stored: after A -> B -> A with re-fitted rows from the store, the held experts (values and
    scales as stored) give exactly the model a fresh build with that re-fit gives, at a fraction of its
    bytes; a held whole build computes the same logits as a dequantised one."""
    from premoe.moe.held import HeldExperts, held_tensors

    q = quantized(case)
    rows = ROWS * 4
    premoe.calibrate(q, write_jsonl(tmp_path / "a.jsonl", rows[:16]), "a", tmp_path / "s", progress=False)
    premoe.calibrate(q, write_jsonl(tmp_path / "b.jsonl", rows[16:]), "b", tmp_path / "s", progress=False)
    premoe.refit(q, tmp_path / "s", 4, tasks=["a"], progress=False)  # stored re-fitted rows for a only
    server = TaskServer(q, tmp_path / "s", 4)
    for task in ("a", "b", "a"):
        server.load(task)
    assert all(isinstance(h, HeldExperts) for _, _, h in held_tensors(server.model))
    weights = server.refit_for("a")
    assert weights is not None and weights.experts
    with ByteReader() as r:
        fresh = build_selective(server.info, server.plan_for("a"), r, refit=weights)
        held = build_selective(server.info, server.plan_for("a"), r, refit=weights, hold=True)
    sa, sb = dequantized_state(server.model), fresh.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    for (_, leaf, a), (_, _, b) in zip(held_tensors(server.model), held_tensors(held)):
        assert all(torch.equal(x.value.view(torch.uint8), y.value.view(torch.uint8)) for x, y in zip(a.parts, b.parts))
        assert all(torch.equal(x.scale, y.scale) for x, y in zip(a.parts, b.parts)), leaf
    x = torch.tensor([[1, 5, 9, 12, 7, 3]])
    with torch.no_grad():
        assert torch.equal(held(input_ids=x).logits, fresh(input_ids=x).logits)
    dense = sum(t.nbytes for t in sb.values())
    assert sum(t.nbytes for t in server.model.state_dict().values()) + held_bytes(server.model) < dense


def test_dequantize_experts_opts_out_of_holding_them_as_stored(quantized, tmp_path):
    from premoe.verbs.serve import task_server

    q = quantized("qwen3_moe-fp8")
    premoe.calibrate(q, write_jsonl(tmp_path / "a.jsonl", ROWS), "a", tmp_path / "s", progress=False)
    held = task_server(q, tmp_path / "s", keep=4, engine="hf")
    plain = task_server(q, tmp_path / "s", keep=4, engine="hf", dequantize_experts=True)
    for server in (held, plain):
        server.load("a")
    assert held_bytes(held.model) > 0 and held_bytes(plain.model) == 0
    assert held.generate("add 2+5=", 4).text == plain.generate("add 2+5=", 4).text


def test_kimi_k2_model_type_loads_through_its_architecture(quantized, tmp_path):
    """Kimi-K2 checkpoints say model_type "kimi_k2" (unknown to transformers) and DeepseekV3ForCausalLM."""
    import shutil

    q = tmp_path / "kimi"
    shutil.copytree(quantized("deepseek_v3-fp8"), q)
    cfg = json.loads((q / "config.json").read_text())
    cfg.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"])
    (q / "config.json").write_text(json.dumps(cfg))
    info = inspect_model(q)
    assert info.spec.name == "deepseek_v3" and info.config_type == "deepseek_v3"
    premoe.calibrate(q, write_jsonl(tmp_path / "d.jsonl", ROWS), "t", tmp_path / "s", progress=False)
    premoe.prune(q, tmp_path / "s", "t", 4, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "kimi_k2"


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_unsupported_quantisation_methods_are_refused(family_dir, tmp_path, method):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(family_dir("qwen3_moe"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"not supported.*\"fp8\".*\"mxfp4\""):
        premoe.calibrate(d, write_jsonl(tmp_path / "x.jsonl", ROWS), "t", tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "qc, match",
    [
        ({"format": "int-quantized"}, "format 'int-quantized' is not supported"),
        (
            {
                "format": "nvfp4-pack-quantized",
                "config_groups": {"g": {"weights": {"type": "float", "num_bits": 4, "group_size": 32}}},
            },
            "group_size 32",
        ),
        (
            {
                "format": "pack-quantized",
                "config_groups": {
                    "g": {
                        "weights": {
                            "type": "int",
                            "num_bits": 4,
                            "strategy": "tensor",
                            "symmetric": False,
                        }
                    }
                },
            },
            "strategy 'tensor'",
        ),
        (
            {
                "format": "pack-quantized",
                "config_groups": {
                    "g": {"weights": {"type": "int", "num_bits": 2, "strategy": "group", "group_size": 8}}
                },
            },
            "2 bits",
        ),
        ({"format": "float-quantized", "config_groups": {}}, "name no weight quantisation"),
        (
            {
                "format": "float-quantized",
                "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4, "strategy": "group"}}},
            },
            "type 'int', 4 bits",
        ),
        (
            {
                "format": "float-quantized",
                "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8, "strategy": "block"}}},
            },
            "block_structure must be",
        ),
    ],
)
def test_compressed_tensors_formats_premoe_does_not_read_are_refused_in_one_line(family_dir, tmp_path, qc, match):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(family_dir("qwen3_moe"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", **qc}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=match) as err:
        premoe.calibrate(d, write_jsonl(tmp_path / "x.jsonl", ROWS), "t", tmp_path / "s", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "s").exists()


def test_scales_that_do_not_match_their_blocks_are_refused(quantized, tmp_path):
    import shutil

    q = tmp_path / "bad"
    shutil.copytree(quantized("qwen3_moe-fp8"), q)
    sd = load_file(q / "model.safetensors")
    key = next(k for k in sd if k.endswith("weight_scale_inv"))
    sd[key] = torch.ones(7, 7)
    save_file(sd, q / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="do not match its weight_block_size"):
        inspect_model(q)
    del sd[key]
    save_file(sd, q / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="has no .*_scale_inv"):
        inspect_model(q)


def test_formats_are_classes_looked_up_by_quant_method():
    """quant_format picks the class by quant_method; every format maps its companions back to their main
    tensor and refuses FP8 bytes it cannot read; an unknown method names the supported ones."""
    from premoe.core.quant import FORMATS, Fp8Blocks, Mxfp4, Plain, quant_format

    assert isinstance(quant_format({}), Plain) and not quant_format({}).quantized
    assert quant_format({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}) == Fp8Blocks(
        (128, 128)
    )
    assert isinstance(quant_format({"text_config": {"quantization_config": {"quant_method": "mxfp4"}}}), Mxfp4)
    assert set(FORMATS) == {"fp8", "mxfp4", "compressed-tensors", "modelopt"}
    assert all(FORMATS[m].method == m for m in FORMATS)
    with pytest.raises(UnsupportedModelError, match="quant_algo .FP8. with group_size"):
        quant_format({"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8"}})
    fp8, mx = Fp8Blocks((2, 2)), Mxfp4()
    assert fp8.companion("a.weight_scale_inv") == ("a.weight", "scale") and fp8.companion("a.weight") is None
    assert (
        mx.companion("e.down_proj_scales") == ("e.down_proj_blocks", "scale")
        and mx.target("e.down_proj_blocks") == "e.down_proj"
    )
    assert fp8.resident_bytes("w", "F8_E4M3", 10, 2) == 20 and mx.resident_bytes("x_blocks", "U8", 10, 2) == 40
    assert Plain().resident_bytes("w", "BF16", 10, 2) == 10
    from premoe.core.checkpoint import TensorInfo

    f8 = TensorInfo("w", Path("x"), "F8_E4M3", (4, 4), 0, 16)
    with pytest.raises(CheckpointError, match="no fp8 quantization_config"):
        Plain().check_tensor("w", f8, None, None)
    with pytest.raises(CheckpointError, match="has no w_scale_inv"):
        fp8.check_tensor("w", f8, None, None)
    with pytest.raises(CheckpointError, match="scales do not match"):
        fp8.check_tensor("w", f8, "w_scale_inv", TensorInfo("s", Path("x"), "F32", (3, 2), 0, 24))
    with pytest.raises(UnsupportedModelError, match='"fp8", "mxfp4"'):
        quant_format({"quantization_config": {"quant_method": "awq"}})


def test_asymmetric_weights_without_their_zero_points_are_refused(quantized, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from premoe.errors import CheckpointError

    d = tmp_path / "m"
    shutil.copytree(quantized("qwen3_moe-ct-w4a16-asym"), d)
    f = d / "model.safetensors"
    t = load_file(f)
    gone = next(k for k in t if k.endswith("experts.0.up_proj.weight_zero_point"))
    save_file({k: v for k, v in t.items() if k != gone}, f)
    with pytest.raises(CheckpointError, match="has no zero beside it") as err:
        inspect_model(d)
    assert "\n" not in str(err.value)


def test_holding_weights_as_stored_hands_large_freed_blocks_back(monkeypatch):
    """The process-wide glibc setting a server holding quantised weights makes: once, and not with
    PREMOE_KEEP_HEAP=1 (what this suite runs with)."""
    import premoe.core.memory as memory

    calls = []

    class Libc:
        def __init__(self):
            self.mallopt = lambda *a: calls.append(a)

    monkeypatch.setattr("ctypes.CDLL", lambda name: Libc())
    monkeypatch.setattr(memory, "_RELEASING", False)
    memory.release_freed_blocks()
    assert calls == []  # PREMOE_KEEP_HEAP=1
    monkeypatch.delenv("PREMOE_KEEP_HEAP")
    memory.release_freed_blocks()
    memory.release_freed_blocks()
    assert calls == [(-3, memory.MMAP_FROM), (-1, 0)]
