"""Checkpoints in Hugging Face format: find them (local folder or hub id), read them, write them.

Reading builds the model on the "meta" device (no memory), then reads one safetensors tensor at a time
straight into the requested dtype and device, so loading never holds a second full copy of the weights.
Writing goes to a temporary folder that is renamed into place at the end, so an interrupted save never
leaves a half-written checkpoint where a good one was.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gr import GRError

# The files a model needs; the hub download asks for nothing else (Llama repos also hold .pth copies).
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
WEIGHT_NAMES = {"model.safetensors", "model.safetensors.index.json"}  # stale after a save with other sharding
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]


def resolve(path_or_id: str | os.PathLike, repo_type: str = "model", allow_patterns=MODEL_FILES) -> Path:
    """A local folder as is; otherwise a hub id, fetched into (or found in) the Hugging Face cache.

    huggingface_hub honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE; offline, a cached snapshot is used.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise GRError(f"'{text}' is not a checkpoint folder (nor a hub id like 'org/name'): pass a folder that holds config.json")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, repo_type=repo_type, allow_patterns=allow_patterns))
    except GatedRepoError:
        raise GRError(f"'{text}' is gated on the hub: accept its license there and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise GRError(f"'{text}' was not found on the hub (or is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise GRError(
            f"'{text}' is not in the Hugging Face cache and the hub cannot be reached (offline): download it once "
            f"with network access (`hf download {text}`) or pass a local checkpoint folder"
        ) from None


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise GRError(f"{folder} has no config.json: it is not a Hugging Face model folder") from None


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise GRError(f"{folder} holds no model.safetensors (nor an index of shards): only safetensors weights are read")


def load_model(cls, path_or_id, dtype: torch.dtype = torch.float32, device="cpu"):
    """Build `cls` (gr.model.Transformer) from a checkpoint; each tensor is checked against the config."""
    from gr.model import ModelConfig

    folder = resolve(path_or_id)
    hf = read_config(folder)
    if hf.get("model_type", "llama") != "llama" or hf.get("hidden_act", "silu") != "silu":
        raise GRError(f"{folder}/config.json describes a '{hf.get('model_type')}' model; only LLaMA models load")
    with torch.device("meta"):
        model = cls(ModelConfig.from_hf(hf))
    expected = dict(model.named_parameters())  # tied weights appear once, under their first name
    state = {}
    for file in weight_files(folder):
        if not file.exists():
            raise GRError(f"shard {file} named in the index is missing: download the checkpoint again")
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name not in expected:
                    if name == "lm_head.weight" and model.config.tie_word_embeddings:
                        continue  # some tied checkpoints store the head too; the embedding is the same
                    raise GRError(f"{file.name}: tensor '{name}' is not part of a LLaMA model with this config.json")
                want = tuple(expected[name].shape)
                got = tuple(f.get_slice(name).get_shape())
                if got != want:
                    raise GRError(f"{file.name}: tensor '{name}' has shape {got} but config.json implies {want}")
                state[name] = f.get_tensor(name).to(dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GRError(f"{folder}: the checkpoint lacks {len(missing)} tensors, e.g. '{missing[0]}'")
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def save_model(model, out_dir, tokenizer_dir=None, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `model` as a Hugging Face folder, atomically (a temporary folder renamed into place)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(model, tmp, tokenizer_dir, max_shard_bytes)
    replace_dir(tmp, out_dir)
    return out_dir


def write_model(model, folder: Path, tokenizer_dir=None, max_shard_bytes: int = 2 * 1024**3) -> None:
    """config.json, generation_config.json, safetensors weights (sharded with an index above
    `max_shard_bytes`) and the tokenizer files of `tokenizer_dir`, into a new folder."""
    folder.mkdir(parents=True)
    cfg = model.config
    dtype = model.lm_head.weight.dtype
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(dtype), indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.to_hf()["eos_token_id"], "pad_token_id": cfg.pad_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    # Tied weights are stored once, under the embedding's name, as transformers does.
    tensors = {
        name: t.detach().to("cpu").contiguous()
        for name, t in model.state_dict().items()
        if not (cfg.tie_word_embeddings and name == "lm_head.weight")
    }
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, folder / name)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place; the old one is removed only after the new one is there.

    Entries of the old folder that the new one lacks (a run's logs, its resume checkpoint) move over.
    """
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    if dest.exists():
        for entry in dest.iterdir():
            if not (tmp / entry.name).exists() and entry.name not in WEIGHT_NAMES and not entry.name.startswith("model-"):
                entry.rename(tmp / entry.name)
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
