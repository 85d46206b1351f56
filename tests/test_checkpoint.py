"""Loading and saving Hugging Face folders: sharded weights, the hub cache, bad checkpoints."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import hf_tiny
from gr import GRError
from gr.checkpoint import load_model, resolve, save_model
from gr.model import Transformer

X = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(0))


def ref_logits(folder):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(X).logits


@pytest.mark.parametrize("tied", [False, True])
def test_saved_checkpoint_loads_in_transformers_with_identical_logits(tmp_path, tied):
    model = load_model(hf_tiny(tmp_path, tie_word_embeddings=tied))
    out = tmp_path / "ours"
    save_model(model, out)
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob(".ours.*"))
    with torch.no_grad():
        ours = model(X)
    assert torch.equal(ref_logits(out), ours)
    again = load_model(out)
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tied


def test_sharded_checkpoint_round_trip(tmp_path):
    model = load_model(hf_tiny(tmp_path))
    out = tmp_path / "sharded"
    save_model(model, out, max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    with torch.no_grad():
        ours = model(X)
        assert torch.equal(load_model(out)(X), ours)
    assert torch.equal(ref_logits(out), ours)


def test_transformers_sharded_checkpoint_loads(tmp_path):
    from transformers import LlamaForCausalLM

    folder = hf_tiny(tmp_path)
    LlamaForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "hf-sharded", max_shard_size="100KB")
    assert (tmp_path / "hf-sharded" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert (ref_logits(folder) - load_model(tmp_path / "hf-sharded")(X)).abs().max() <= 1e-5


def test_load_into_bf16(tmp_path):
    model = load_model(hf_tiny(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(X).dtype == torch.bfloat16


def test_shape_mismatch_names_the_tensor(tmp_path):
    folder = hf_tiny(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GRError, match=r"model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' has shape \(64, 160\) but config.json implies \(64, 128\)"):
        load_model(folder)


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(GRError, match="not a checkpoint folder"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GRError, match="has no config.json"):
        load_model(tmp_path / "empty")


@pytest.mark.parametrize("damage, message", [
    ("half weights", "cannot be read as safetensors"),
    ("empty weights", "cannot be read as safetensors"),
    ("config not JSON", "config.json is not valid JSON"),
    ("config not an object", "config.json is not a JSON object"),
    ("config not LLaMA", "does not describe a LLaMA model"),
])
def test_a_damaged_folder_is_one_clear_error(tmp_path, damage, message):
    folder = hf_tiny(tmp_path)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "half weights":
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif damage == "empty weights":
        weights.write_bytes(b"")
    elif damage == "config not JSON":
        config.write_text(config.read_text()[:40])
    elif damage == "config not an object":
        config.write_text("[1, 2]")
    else:
        config.write_text(json.dumps(dict(json.loads(config.read_text()), hidden_size="big")))
    with pytest.raises(GRError, match=message):
        load_model(folder)


def test_an_unfinished_run_points_at_its_checkpoint(tmp_path):
    """After train_sft.py --max-steps, the run's folder holds a resume checkpoint and no model yet."""
    run = tmp_path / "sft"
    shutil.copytree(hf_tiny(tmp_path), run / "checkpoint")
    with pytest.raises(GRError, match=f"{run} holds an unfinished training run.*use its last checkpoint, {run / 'checkpoint'}"):
        load_model(run)
    assert load_model(run / "checkpoint") is not None


def fake_hub_cache(hf_home, repo_id, files_from):
    """Lay out a folder the way huggingface_hub's cache stores a downloaded snapshot."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_from_the_cache_offline(tmp_path, monkeypatch):
    folder = hf_tiny(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    snapshot = fake_hub_cache(tmp_path / "hf", "someone/tiny-llama", folder)
    assert resolve("someone/tiny-llama") == snapshot
    with torch.no_grad():
        assert torch.equal(load_model("someone/tiny-llama")(X), load_model(folder)(X))
    with pytest.raises(GRError, match=r"'someone/other' is not in the Hugging Face cache .* pass a local checkpoint folder"):
        resolve("someone/other")
