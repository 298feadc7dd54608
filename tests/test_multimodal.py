"""Multimodal releases (Llama-4, Qwen3.5-MoE, Kimi-K2.5...): the language model's experts are pruned,
the other towers are kept byte for byte, and the export loads in the multimodal class."""

import json

import torch
from safetensors import safe_open

import premoe
from premoe.core.data import write_jsonl
from premoe.core.tasks import char_tokenizer


def test_llama4_multimodal_checkpoint_prunes_its_text_experts(tmp_path):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    tok = char_tokenizer()
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        intermediate_size_mlp=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=16,
        vision_output_dim=32,
        projector_input_dim=32,
        projector_output_dim=32,
    )
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).eval()
    src = tmp_path / "vlm"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    info = premoe.inspect_model(src)
    assert (info.spec.name, info.text_key, info.moe_layers) == ("llama4_text", "text_config", [0, 1])
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "add 1+2=3"}, {"text": "sort 321=123"}])
    a = premoe.calibrate(src, data, "a", tmp_path / "s", progress=False)
    b = premoe.calibrate(src, data, "b", tmp_path / "s", stream=True, progress=False)
    assert all(torch.equal(a.means[k], b.means[k]) for k in a.means)
    premoe.prune(src, tmp_path / "s", "a", 8, tmp_path / "all", progress=False)  # keeps every expert
    same = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "all").state_dict()
    ref = model.state_dict()
    assert set(same) == set(ref) and all(torch.equal(same[k], ref[k]) for k in ref)
    premoe.prune(src, tmp_path / "s", "a", 4, tmp_path / "four", progress=False)
    cfg = json.loads((tmp_path / "four" / "config.json").read_text())
    assert cfg["model_type"] == "llama4" and cfg["text_config"]["num_local_experts"] == 4
    pruned, loading = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "four", output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with safe_open(tmp_path / "four" / "model.safetensors", "pt") as f:
        vision_keys = [k for k in f.keys() if k.startswith(("vision_model.", "multi_modal_projector."))]
        assert vision_keys and all(torch.equal(f.get_tensor(k), ref[k]) for k in vision_keys)


def test_kimi_k25_layout_prunes_its_deepseek_v3_experts(tmp_path):
    """Kimi-K2.5: a DeepSeek-V3 language model under `language_model.`, which transformers' text model
    does not strip by itself; the export loads in Kimi_K25ForConditionalGeneration."""
    from safetensors.torch import load_file, save_file
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    from premoe.testing import COMMON, FAMILIES

    tok = char_tokenizer()
    text = {
        **COMMON,
        **FAMILIES["deepseek_v3"][1],
        "model_type": "deepseek_v3",
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        patch_size=14,
        init_pos_emb_height=4,
        init_pos_emb_width=4,
    )
    torch.manual_seed(0)
    model = Kimi_K25ForConditionalGeneration(
        Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=32)
    ).eval()
    src = tmp_path / "kimi"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    shard = next(src.glob("*.safetensors"))  # as published: the language model's layers are `layers`
    sd = {
        k.replace("language_model.model.blocks.", "language_model.model.layers."): v
        for k, v in load_file(shard).items()
    }
    save_file(sd, shard, metadata={"format": "pt"})
    info = premoe.inspect_model(src)
    assert (info.spec.name, info.text_key) == ("deepseek_v3", "text_config")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "add 1+2=3"}, {"text": "sort 321=123"}])
    a = premoe.calibrate(src, data, "a", tmp_path / "s", progress=False)
    b = premoe.calibrate(src, data, "b", tmp_path / "s", stream=True, progress=False)
    assert all(torch.equal(a.means[k], b.means[k]) for k in a.means)
    premoe.prune(src, tmp_path / "s", "a", 8, tmp_path / "all", progress=False)
    same, ref = Kimi_K25ForConditionalGeneration.from_pretrained(tmp_path / "all").state_dict(), model.state_dict()
    assert set(same) == set(ref) and all(torch.equal(same[k], ref[k]) for k in ref)
    premoe.prune(src, tmp_path / "s", "a", 4, tmp_path / "four", progress=False)
    _, loading = Kimi_K25ForConditionalGeneration.from_pretrained(tmp_path / "four", output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert json.loads((tmp_path / "four" / "config.json").read_text())["text_config"]["n_routed_experts"] == 4
