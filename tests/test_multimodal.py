"""Multimodal releases (Llama-4, Qwen3.5-MoE, Kimi-K2.5...): the language model's experts are pruned,
the other towers are kept byte for byte, and the export loads in the multimodal class."""

import json

import torch
from safetensors import safe_open

import premoe
from premoe.tasks import char_tokenizer

from conftest import write_jsonl


def test_llama4_multimodal_checkpoint_prunes_its_text_experts(tmp_path):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    tok = char_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, intermediate_size_mlp=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=1,
                interleave_moe_layer_step=1, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=16, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
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
