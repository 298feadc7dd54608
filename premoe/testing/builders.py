"""Building tiny models of every family (random weights, the char tokenizer) and saving them as their
variant, or as a quantised hub release would be."""

from __future__ import annotations

from pathlib import Path

import torch

from premoe.core.tasks import char_tokenizer
from premoe.testing.families import COMMON, DENSE_FAMILIES, FAMILIES
from premoe.testing.variants import PLAIN, Variant, dense_variant, family_variant


def build_family(name: str, path: Path, seed: int = 0) -> Path:
    """Row ``name`` of :data:`FAMILIES`, built and saved at ``path`` as its :func:`family_variant`."""
    model_type, overrides, _ = FAMILIES[name]
    variant = family_variant(name)
    model, tok = build_model(model_type, overrides, seed, variant=variant)
    return save_model(model, tok, Path(path), variant)


def build_model(model_type: str, overrides: dict, seed: int = 0, variant: Variant | None = None, tokenizer=None):
    """A tiny random MoE model of ``model_type`` and the char tokenizer (or ``tokenizer``: the vocabulary is its
    size). ``variant`` (default: the family's config defaults) sets the head tying and bias flags;
    :func:`save_model` applies its storage."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    tok = tokenizer or char_tokenizer()
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


def bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer, BOS added), trained on the built-in tasks' samples: the
    kind of tokenizer llama.cpp's converter reads (merges and all), unlike the char tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from premoe.core.tasks import TASKS, samples

    texts = [r["prompt"] + r["completion"] for t in TASKS for r in samples(t, 200, "calib")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


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


def quantize_checkpoint(src: Path, out: Path, method: str, block: tuple[int, int] | None = (16, 16)) -> Path:
    """Write ``src`` (a tiny model saved by transformers) as its family's quantised hub release would be:

    * ``fp8`` (DeepSeek-V3, Kimi-K2, Qwen3-FP8, GLM-4.x-FP8): every linear weight matrix (attention, dense
      and shared MLPs, every expert) in float8_e4m3fn with a float32 ``weight_scale_inv`` per ``block``;
      embeddings, LM head, norms and router tensors as they are; ``quantization_config`` added.
    * ``mxfp4`` (GPT-OSS): the fused expert matrices as ``*_blocks`` / ``*_scales`` in the hub's [E, out, in]
      orientation (32 values per E8M0 scale), everything else as it is.
    * ``compressed-tensors`` (llm-compressor's ``float-quantized`` FP8, Qwen3 / GLM FP8 releases): the same
      matrices as ``fp8`` in float8_e4m3fn with ``weight_scale`` per output channel, or per ``block`` with
      ``compressed-tensors/block``, or per tensor with ``compressed-tensors/tensor``;
      ``compressed-tensors/w4g16`` (``w8g16``, ``w4``...): ``pack-quantized`` symmetric INT4 (INT8) experts, one
      scale per 16 inputs (per channel without ``g``), as Kimi-K2-Thinking's W4A16 release; a trailing ``a``
      (``w4g16a``) makes them asymmetric, with packed zero points (llm-compressor's ``W4A16_ASYM``);
      ``compressed-tensors/nvfp4``: ``nvfp4-pack-quantized`` experts (FP8 scales per 16 values, a global scale).
    * ``modelopt`` (NVIDIA's FP4 releases): the experts in ModelOpt's NVFP4 layout (``weight`` uint8,
      ``weight_scale`` e4m3, ``weight_scale_2``).
    """
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from premoe.core.quant import (
        FORMATS,
        CompressedFp8,
        CompressedNvfp4,
        CompressedPacked,
        CompressedTensors,
        Fp8Blocks,
        ModelOptNvfp4,
    )
    from premoe.moe.model import inspect_model

    method, _, strategy = method.partition("/")
    if method not in FORMATS:
        raise ValueError(f"unknown quantisation method {method!r}; choose from {', '.join(FORMATS)}")
    if method == "modelopt":
        fmt = ModelOptNvfp4()
    elif FORMATS[method] is Fp8Blocks:
        fmt = Fp8Blocks(block)
    elif FORMATS[method] is CompressedTensors and strategy == "nvfp4":
        fmt = CompressedNvfp4()
    elif FORMATS[method] is CompressedTensors and strategy.startswith("w"):
        asym = strategy.endswith("a")
        bits, _, group = strategy[1:].removesuffix("a").partition("g")
        fmt = CompressedPacked(int(bits), int(group) if group else None, symmetric=not asym)
    elif FORMATS[method] is CompressedTensors:
        fmt = CompressedFp8(strategy or "channel", block if strategy == "block" else None)
    else:
        fmt = FORMATS[method]()
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
