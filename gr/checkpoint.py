"""Checkpoints in Hugging Face format: find them (local folder or hub id), read them, write them, and the
resume checkpoints that training keeps beside them.

Reading builds the model on the "meta" device (no memory), then reads one safetensors tensor at a time
straight into the requested dtype and device, so loading never holds a second full copy of the weights.
Writing goes to a folder under a temporary name that is swapped into place at the end (gr.files), so an
interrupted save never leaves a half-written checkpoint, nor a moment without one, where a good one was.
"""

import json
import shutil
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gr import GRError
from gr.files import recover_dir, replace_dir, temporary_dir
from gr.model import ModelConfig, Transformer
from gr.tokenizer import Tokenizer

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
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
GUARD_FILE = "guard.json"  # a guard's own settings (its fast instruction); travels with the tokenizer files
RESUME_DIR = "checkpoint"  # inside a run's output folder, while the run is unfinished
TRAINER_STATE = "trainer_state.pt"


def resolve(path_or_id, repo_type: str = "model", allow_patterns=MODEL_FILES) -> Path:
    """A local folder as is; otherwise a hub id, fetched into (or found in) the Hugging Face cache.

    huggingface_hub honours HF_HOME, HF_TOKEN and HF_HUB_OFFLINE; offline, a cached snapshot is used.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise GRError(f"'{text}' is not a checkpoint folder (nor a hub id like 'org/name'): pass a folder that holds config.json")
    from huggingface_hub import snapshot_download  # the hub client only when a hub id is asked for
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


def config_from_hf(hf: dict) -> ModelConfig:
    """Read a Hugging Face LLaMA config.json in either of its two forms.

    Older files carry `rope_theta` + `rope_scaling` (whose kind is `rope_type`, or `type` in some);
    files written by transformers 5 carry one `rope_parameters` dict holding all of it.
    """
    known = {f.name for f in fields(ModelConfig)} - {"rope_theta", "rope_scaling", "eos_token_id", "head_dim"}
    kw = {k: v for k, v in hf.items() if k in known}
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    if kind not in ("default", "llama3", "linear"):
        raise GRError(f"rope type '{kind}' is not supported (default, linear and llama3 are)")
    eos = hf.get("eos_token_id")
    return ModelConfig(
        **kw,
        head_dim=hf.get("head_dim") or 0,
        rope_theta=float(theta),
        rope_scaling=None if kind == "default" else {"rope_type": kind, **rope},
        eos_token_id=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
    )


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A config.json in the `rope_theta` + `rope_scaling` form, which every LLaMA loader reads."""
    hf = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    hf["eos_token_id"] = cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else cfg.eos_token_id
    hf.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              torch_dtype=str(dtype).removeprefix("torch."))
    return hf


def read_config(folder: Path) -> dict:
    """config.json of a model folder; a run that has not finished yet is named as such."""
    try:
        hf = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        if (folder / RESUME_DIR).is_dir() or temporary_dir(folder / RESUME_DIR).is_dir():
            raise GRError(f"{folder} holds an unfinished training run, no model yet: finish it with --resume, "
                          f"or use its last checkpoint, {folder / RESUME_DIR}") from None
        raise GRError(f"{folder} has no config.json: it is not a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GRError(f"{folder}/config.json is not valid JSON ({e}): the folder is damaged, write or download it again") from None
    if not isinstance(hf, dict):
        raise GRError(f"{folder}/config.json is not a JSON object: the folder is damaged")
    return hf


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise GRError(f"{index} is not a valid index of shards: the folder is damaged") from None
        return [folder / s for s in shards]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise GRError(f"{folder} holds no model.safetensors (nor an index of shards): only safetensors weights are read")


def load_model(path_or_id, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    """A Transformer from a checkpoint folder or hub id; each tensor is checked against config.json."""
    folder = resolve(path_or_id)
    hf = read_config(folder)
    if hf.get("model_type", "llama") != "llama" or hf.get("hidden_act", "silu") != "silu":
        raise GRError(f"{folder}/config.json describes a '{hf.get('model_type')}' model; only LLaMA models load")
    try:
        cfg = config_from_hf(hf)
        with torch.device("meta"):
            model = Transformer(cfg)
    except (TypeError, ValueError, RuntimeError) as e:
        raise GRError(f"{folder}/config.json does not describe a LLaMA model ({e})") from None
    expected = dict(model.named_parameters())  # tied weights appear once, under their first name
    state = {}
    for file in weight_files(folder):
        if not file.exists():
            raise GRError(f"shard {file} named in the index is missing: download the checkpoint again")
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name not in expected:
                        if name == "lm_head.weight" and cfg.tie_word_embeddings:
                            continue  # some tied checkpoints store the head too; the embedding is the same
                        raise GRError(f"{file.name}: tensor '{name}' is not part of a LLaMA model with this config.json")
                    want = tuple(expected[name].shape)
                    got = tuple(f.get_slice(name).get_shape())
                    if got != want:
                        raise GRError(f"{file.name}: tensor '{name}' has shape {got} but config.json implies {want}")
                    state[name] = f.get_tensor(name).to(dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise GRError(f"{file} cannot be read as safetensors ({e}): the file is damaged or incomplete, "
                          "write or download it again") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GRError(f"{folder}: the checkpoint lacks {len(missing)} tensors, e.g. '{missing[0]}'")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def load_tokenizer(path_or_id) -> Tokenizer:
    """The tokenizer of a checkpoint folder or hub id."""
    return Tokenizer.from_folder(resolve(path_or_id))


def write_model(model: Transformer, folder: Path, tokenizer_dir=None, max_shard_bytes: int = 2 * 1024**3) -> None:
    """config.json, generation_config.json, safetensors weights (sharded with an index above
    `max_shard_bytes`) and the tokenizer files (and guard.json) of `tokenizer_dir`, into a new folder."""
    folder.mkdir(parents=True)
    cfg = model.config
    dtype = model.lm_head.weight.dtype
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    eos = cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else cfg.eos_token_id
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}
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
        for name in [*TOKENIZER_FILES, GUARD_FILE]:
            if (Path(tokenizer_dir) / name).exists():
                (folder / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())


def _not_weights(name: str) -> bool:
    """What a run keeps in its folder besides the model (logs, mining results, its resume checkpoint)."""
    model_files = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES}
    return name not in model_files and not (name.startswith("model-") and name.endswith(".safetensors"))


def save_model(model: Transformer, out_dir, tokenizer_dir=None, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `model` as a Hugging Face folder, swapped in atomically; what else the folder holds stays."""
    out_dir = Path(out_dir)
    tmp = temporary_dir(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
    write_model(model, tmp, tokenizer_dir, max_shard_bytes)
    replace_dir(tmp, out_dir, keep=_not_weights)
    return out_dir


def save_resume(out_dir, model: Transformer, trainer_state: dict, tokenizer_dir=None) -> None:
    """The resume checkpoint of a run: its model and trainer state, swapped in whole as out_dir/checkpoint."""
    dest = Path(out_dir) / RESUME_DIR
    tmp = temporary_dir(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(model, tmp, tokenizer_dir)
    torch.save(trainer_state, tmp / TRAINER_STATE)  # written last: its presence marks a complete checkpoint
    replace_dir(tmp, dest)


def find_resume(out_dir) -> Path | None:
    """The run's latest complete resume checkpoint, out_dir/checkpoint, after swapping in a newer one that
    a kill left under its temporary name; None when there is none."""
    def step(folder: Path) -> int:
        return load_trainer_state(folder, mmap=True)["step"]

    return recover_dir(Path(out_dir) / RESUME_DIR, complete=lambda f: (f / TRAINER_STATE).is_file(), order=step)


def load_trainer_state(folder: Path, mmap: bool = False) -> dict:
    """The trainer state of a resume checkpoint, onto the CPU (the optimizer moves it to its parameters)."""
    return torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False, mmap=mmap)
