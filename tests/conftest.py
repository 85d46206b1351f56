"""Shared fixtures: tiny Hugging Face checkpoints written by transformers itself, and the real
SmolLM2-135M-Instruct checkpoint that ../shared/tools/make-smollm2 builds (CI builds it first)."""

import os
from pathlib import Path

import pytest
import torch

from gr.checkpoint import save_model
from gr.model import ModelConfig, Transformer
from gr.prompts import INSTRUCTION, format_answers, format_input
from gr.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SMOLLM2 = Path(os.environ.get("GR_SMOLLM2", Path.home() / ".cache/gr-fixtures/smollm2-135m-instruct"))


def hf_tiny(tmp_path: Path, name: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialized transformers LlamaForCausalLM with a small config to a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    # Random init leaves the norms at 1; perturb them so a mistake in RMSNorm's weight would show.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not (SMOLLM2 / ".complete").exists():
        pytest.skip(f"no SmolLM2 checkpoint at {SMOLLM2}: build it with ../shared/tools/make-smollm2 (CI does)")
    return SMOLLM2


def tiny_guard(folder: Path) -> Path:
    """A random 2-layer LLaMA with a 300-token byte-level BPE, saved as a Hugging Face folder."""
    texts = [INSTRUCTION, format_input("How do I bake bread?", "Knead, rest, bake."),
             format_answers("harmful", "refusal", "unharmful"), "naïve café 日本語"] * 3
    tokenizer = train_bpe(texts, 300, folder / "tokenizer")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_id, eos_token_id=[tokenizer.eos_id])
    model = Transformer(config)
    model.init_weights(seed=0)
    save_model(model, folder / "model", tokenizer_dir=folder / "tokenizer")
    return folder / "model"
