"""Our transformer against transformers' LlamaForCausalLM, on checkpoints transformers itself wrote."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import hf_tiny
from gr import GRError
from gr.checkpoint import config_from_hf, load_model, load_tokenizer
from gr.model import KVCache, ModelConfig, Transformer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CONFIGS = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}),
    "head-dim-24": dict(head_dim=24, num_attention_heads=4, num_key_value_heads=1),
}


def logits_of(folder, x, mask=None):
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder)
    with torch.no_grad():
        return ref(x, attention_mask=mask).logits, ours(x, attention_mask=mask)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(tmp_path, name):
    folder = hf_tiny(tmp_path, **CONFIGS[name])
    x = torch.randint(0, 300, (3, 70), generator=torch.Generator().manual_seed(1))
    ref, ours = logits_of(folder, x)
    assert ours.shape == (3, 70, 300)
    assert (ref - ours).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind_key", ["rope_type", "type"])
def test_old_rope_scaling_config_form(tmp_path, kind_key):
    """Llama 3.2's hub config.json: rope_theta at the top, rope_scaling with rope_type (or type)."""
    folder = hf_tiny(tmp_path, rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}, tie_word_embeddings=True)
    x = torch.randint(0, 300, (2, 90), generator=torch.Generator().manual_seed(2))
    new_ref, _ = logits_of(folder, x)
    hf = json.loads((folder / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    rope[kind_key] = rope.pop("rope_type")
    hf["rope_scaling"] = rope
    (folder / "config.json").write_text(json.dumps(hf))
    cfg = config_from_hf(hf)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    ref, ours = logits_of(folder, x)
    assert (new_ref - ours).abs().max().item() <= 1e-4
    assert (ref - ours).abs().max().item() <= 1e-4


def test_config_fields():
    cfg = config_from_hf({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "eos_token_id": [1, 3], "rms_norm_eps": 1e-6, "tie_word_embeddings": True})
    assert (cfg.head_dim, cfg.eos_token_id, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (16, [1, 3], 1e-6, True)
    assert config_from_hf({"eos_token_id": 7}).eos_token_id == [7]
    with pytest.raises(GRError, match="yarn"):
        config_from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_left_padded_batch_matches_transformers_and_single_rows(tmp_path):
    folder = hf_tiny(tmp_path)
    g = torch.Generator().manual_seed(3)
    lengths = [12, 5, 9]
    x = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, 12 - n:] = torch.randint(3, 300, (n,), generator=g)
        mask[i, 12 - n:] = 1
    ref, ours = logits_of(folder, x, mask)
    real = mask.bool()
    assert (ref[real] - ours[real]).abs().max().item() <= 1e-4
    model = load_model(folder)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            alone = model(x[i:i + 1, 12 - n:])[0]
            assert (alone - ours[i, 12 - n:]).abs().max().item() <= 1e-5


def test_kv_cache_decoding_equals_full_recompute(tmp_path):
    model = load_model(hf_tiny(tmp_path, head_dim=24))
    x = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(4))
    cache = KVCache(model.config, 2, 40, torch.float32, "cpu")
    with torch.no_grad():
        full = model(x)
        steps = [model(x[:, :20], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(20, 30)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    model = load_model(hf_tiny(tmp_path)).train()
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x).logsumexp(-1).mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_smollm2_real_weights_match_transformers(smollm2):
    """Real pretrained weights: logits within 1e-3 in fp32 and 64 greedy tokens of a chat reply equal."""
    from gr.generate import generate
    from gr.tokenizer import Tokenizer

    tok = load_tokenizer(smollm2)
    ref_tok = AutoTokenizer.from_pretrained(smollm2)
    question = "Tell me about the history of Paris, the capital of France, in a long paragraph."
    chat = [{"role": "user", "content": question}]
    ref_ids = ref_tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode_template(text)
    assert list(ref_ids) == ids
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ours = load_model(smollm2, dtype=torch.float32)
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ref(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-3
    want = ref.generate(x, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_id)[0, len(ids):]
    got = generate(ours, [ids], max_new_tokens=64, stop_ids=tok.stop_ids)[0]
    assert len(got) == 64 and got == want.tolist()
    assert "Paris" in tok.decode(got)
