"""Per-token prompt log-probabilities of any checkpoint in a fresh vLLM engine (tests/test_vllm.py compares
them with premoe's engines).

Run it with the Python that has vLLM (it pins its own transformers, so it usually lives in a separate virtual
environment: docs/serving.md#installing-vllm-next-to-premoe):

    $VLLM_PYTHON scripts/vllm_logprobs.py MODEL_DIR PROMPTS.json OUT.json [float32|bfloat16]

PROMPTS.json is a list of token-id lists. OUT.json gets one list per prompt: the log-probability of each
token given the ones before it (none for the first).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default reservation exceeds a small machine
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")  # one thread, on CPU 0
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # start in-process: seconds instead of ~20


def main() -> None:
    from vllm import LLM, SamplingParams

    model, prompts_path, out = sys.argv[1:4]
    dtype = sys.argv[4] if len(sys.argv) > 4 else "float32"
    prompts = json.load(open(prompts_path))
    llm = LLM(
        model=model, dtype=dtype, enforce_eager=True, max_model_len=64, max_num_seqs=8, seed=0, skip_tokenizer_init=True
    )
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    result = [[None] + [d[t].logprob for t, d in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])] for o in outs]
    json.dump(result, open(out, "w"))


if __name__ == "__main__":  # vLLM may spawn worker processes
    main()
