"""GGUF, the way llama.cpp users go: premoe's pruned exports convert with llama.cpp's own ``convert_hf_to_gguf.py``
and run in llama.cpp with the same greedy answers as transformers.

Cases: a bf16 Mixtral and a bf16 Qwen3-MoE export, a DeepSeek-V3 export from a block-FP8 checkpoint (its kept
experts written in FP8 as stored; llama.cpp's converter dequantises them itself), and a Qwen3-MoE export with
``--quantize w4a16`` (compressed-tensors, which the converter dequantises too). Each is calibrated and pruned to
half its experts with the default re-fit, converted to a float32 GGUF, and run from the same token ids in llama.cpp
(llama-cpp-python) and in transformers: the greedy continuations are equal, the next-token logits agree, and
llama.cpp tokenizes the prompts as the tokenizer does.

Opt-in, llama.cpp is not a dependency: ``PREMOE_LLAMA_CPP`` names a llama.cpp source tree and
``PREMOE_LLAMA_PYTHON`` a Python with its conversion requirements and llama-cpp-python (docs/gguf.md)::

    PREMOE_LLAMA_CPP=~/llama.cpp PREMOE_LLAMA_PYTHON=~/llamacpp/bin/python pytest -m gguf tests/test_gguf.py
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import premoe
from premoe.core.data import write_jsonl
from premoe.core.tasks import samples

LLAMA_CPP = os.environ.get("PREMOE_LLAMA_CPP")
LLAMA_PYTHON = os.environ.get("PREMOE_LLAMA_PYTHON")
pytestmark = [
    pytest.mark.gguf,
    pytest.mark.skipif(
        not (LLAMA_CPP and LLAMA_PYTHON and (Path(LLAMA_CPP) / "convert_hf_to_gguf.py").is_file()),
        reason="set PREMOE_LLAMA_CPP (a llama.cpp tree) and PREMOE_LLAMA_PYTHON (docs/gguf.md)",
    ),
]

# premoe's test models use a byte-level BPE tokenizer of their own. llama.cpp's converter names a BPE tokenizer's
# pre-tokenizer from a table of hashes of known tokenizers' output, which cannot hold this one: it is registered as
# GPT-2's, the pre-tokenizer it is built with. Nothing else of the converter is changed.
CONVERT = """
import runpy, sys
from pathlib import Path
script = Path(sys.argv[1])
sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [str(script), *sys.argv[2:]]
runpy.run_path(str(script), run_name="__main__")
"""

# Greedy decoding in llama.cpp from given token ids, and its own tokenization of the prompts.
RUN = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, requests = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=path, n_ctx=0, n_threads=1, n_batch=128, logits_all=True, verbose=False, seed=0)
out = []
for text, ids, n in requests:
    llm.reset()
    llm.eval(ids)
    first = llm.scores[llm.n_tokens - 1].tolist()
    greedy = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(token)
        llm.eval([token])
    out.append({"tokens": llm.tokenize(text.encode(), add_bos=False, special=False), "first": first, "greedy": greedy})
print(json.dumps({"runs": out, "metadata": llm.metadata}))
"""

CASES = {  # family, the source's quantisation, `prune --quantize`
    "mixtral-bf16": ("mixtral", None, None),
    "qwen3_moe-bf16": ("qwen3_moe", None, None),
    "qwen3_moe-fp8": ("qwen3_moe", "fp8", None),
    "qwen3_moe-w4a16": ("qwen3_moe", None, "w4a16"),
    "deepseek_v3-fp8": ("deepseek_v3", "fp8", None),
}
# llama.cpp's DeepSeek-V3 (MLA) and transformers' disagree by about 2% of the logits' scale on the unpruned tiny
# model already: for it, the pruned export must add no disagreement of its own (its gap at most the source's, with
# margin), and the greedy answers are not compared.
SOURCE_GAP = {"deepseek_v3"}
NEW_TOKENS = 12


def source(name: str, quant: str | None, root: Path) -> Path:
    from premoe.testing import FAMILIES, Variant, bpe_tokenizer, build_model, quantize_checkpoint, save_model

    model_type, overrides, _ = FAMILIES[name]
    variant = Variant(tied=False, dtype="bfloat16")
    model, tok = build_model(model_type, overrides, 0, variant=variant, tokenizer=bpe_tokenizer())
    path = save_model(model, tok, root / name, variant)
    return quantize_checkpoint(path, root / f"{name}-{quant}", quant) if quant else path


def transformers_greedy(
    export: Path, quantized: bool, prompts: list[list[int]]
) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy continuations and next-token logits, in float32: vanilla transformers for plain exports; for quantised
    ones premoe's reader (dequantised as the checkpoint's scales say), since transformers' FP8 path needs a GPU
    and it cannot fuse packed per-expert INT4 weights."""
    if quantized:
        model = premoe.load_model(export, device="cpu", dtype="float32").model
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            first = model(input_ids=x).logits[0, -1]
            gen = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
            out.append((gen[0, len(ids) :].tolist(), first))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_export_runs_in_llama_cpp_like_transformers(case, tmp_path):
    name, quant, quantize = CASES[case]
    src = source(name, quant, tmp_path)
    data = write_jsonl(tmp_path / "cal.jsonl", samples("add", 16, "calib") + samples("sort", 16, "calib"))
    premoe.calibrate(src, data, "t", tmp_path / "store", batch_size=8, progress=False)
    experts = premoe.inspect_model(src).num_experts
    export = tmp_path / "pruned"
    extra = {"quantize": quantize, "quantize_group": 16} if quantize else {}
    premoe.prune(src, tmp_path / "store", task="t", keep=experts // 2, out=export, progress=False, **extra)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    texts = [r["prompt"] for r in samples("add", 3, "eval") + samples("sort", 3, "eval")]
    prompts = [tok(t)["input_ids"] for t in texts]
    meta, llama = in_llama_cpp(export, tmp_path / "pruned.gguf", texts, prompts)
    arch = meta["general.architecture"]
    assert int(meta[f"{arch}.expert_count"]) == experts // 2  # the pruned geometry, read from premoe's config
    want = transformers_greedy(export, bool(quant or quantize), prompts)
    gap = max(float((torch.tensor(got["first"]) - first).abs().max()) for got, (_, first) in zip(llama, want))
    for text, got in zip(texts, llama):
        assert got["tokens"] == tok(text, add_special_tokens=False)["input_ids"], text
    if name in SOURCE_GAP:  # the source's own gap between llama.cpp and transformers
        _, dense = in_llama_cpp(src, tmp_path / "source.gguf", texts, prompts)
        ref = transformers_greedy(src, bool(quant), prompts)
        source_gap = max(float((torch.tensor(got["first"]) - first).abs().max()) for got, (_, first) in zip(dense, ref))
        same = sum(got["greedy"] == greedy for got, (greedy, _) in zip(llama, want))
        print(f"\n{case}: max logit gap {gap:.1e} (source's {source_gap:.1e}), greedy equal {same}/{len(texts)}")
        assert gap <= 2 * source_gap + 1e-3, (gap, source_gap)
        return
    scale = max(float(first.abs().max()) for _, first in want)
    print(f"\n{case}: max logit gap {gap:.1e} (logits up to {scale:.2f}), {len(texts)} prompts x {NEW_TOKENS} tokens")
    assert gap <= 1e-3 * max(1.0, scale), gap
    for text, got, (greedy, _) in zip(texts, llama, want):
        assert got["greedy"] == greedy, text


def in_llama_cpp(model: Path, gguf: Path, texts: list[str], prompts: list[list[int]]) -> tuple[dict, list[dict]]:
    """``model`` converted by llama.cpp's converter to a float32 GGUF and run there: its metadata, and per prompt
    llama.cpp's tokens of the text, the next-token logits and the greedy continuation."""
    conv = subprocess.run(
        [LLAMA_PYTHON, "-c", CONVERT, str(Path(LLAMA_CPP) / "convert_hf_to_gguf.py"), str(model), "--outtype", "f32",
         "--outfile", str(gguf)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert conv.returncode == 0, conv.stderr[-3000:]
    run = subprocess.run(
        [LLAMA_PYTHON, "-c", RUN, str(gguf), json.dumps([[t, ids, NEW_TOKENS] for t, ids in zip(texts, prompts)])],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    return got["metadata"], got["runs"]
