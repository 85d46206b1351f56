"""Training and benchmark data (paper section 3, and the benchmark files of section 7), and its tokenization.

Rows are GuardReasonerTrain's: {"instruction", "input", "output"} plus the seed `source` they came from
(wildguard, aegis, beavertails, toxicchat), which the leave-one-source-out models of section 5 need.
Sources of rows:
- the dataset this project ships in data/ (`shipped`), authored by following the paper's recipe;
- GuardReasonerTrain from the hub (`guardreasoner`, 127k rows), through huggingface_hub's cache;
- the authors' benchmark files, downloaded once from their GitHub repository into our cache;
- any local file (.json list or .jsonl) or folder in these formats.

Tokenization turns a row into input ids and labels where the prompt is masked (-100): R-SFT learns the
output (reasoning + answers) and its stop token only.
"""

import json
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from gr import GRError
from gr.files import cache_dir, read_jsonl
from gr.prompts import CHAT_HEAD, CHAT_STOP, CHAT_TAIL

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
IGNORE = -100  # label of a token that is not learned (prompt, padding)

HUB_TRAIN = "yueliu1999/GuardReasonerTrain"
# split name on the hub -> (its file, our source name)
HUB_SPLITS = {
    "WildGuardTrainR": ("WildGuardTrain-R.json", "wildguard"),
    "AegisTrainR": ("AegisTrain-R.json", "aegis"),
    "BeaverTailsTrainR": ("BeaverTailsTrain-R.json", "beavertails"),
    "ToxicChatTrainR": ("ToxicChatTrain-R.json", "toxicchat"),
}
SOURCES = ("wildguard", "aegis", "beavertails", "toxicchat")

BENCHMARK_URL = "https://raw.githubusercontent.com/yueliu1999/GuardReasoner/main/data/benchmark/{file}"
# name (as the released predictions call it) -> (file in the authors' data/benchmark/, tasks it scores)
BENCHMARKS = {
    "ToxicChat": ("0_8_toxic_chat.json", ("request",)),
    "HarmBenchPrompt": ("0_3_harmbench_prompt.json", ("request",)),
    "OpenAIModeration": ("0_2_OpenAIModeration.json", ("request",)),
    "AegisSafetyTest": ("0_1_AegisSafetyTest.json", ("request",)),
    "SimpleSafetyTests": ("0_0_SimpleSafetyTests.json", ("request",)),
    "WildGuardTest": ("0_4_wild_guard_test.json", ("request", "response", "completion")),
    "HarmBenchResponse": ("0_5_harmbench_response.json", ("response",)),
    "SafeRLHF": ("0_9_safe_rlhf.json", ("response",)),
    "BeaverTails": ("0_A_beaver_tails.json", ("response",)),
    "XSTestReponseHarmful": ("0_6_xstest_response_harmful.json", ("response",)),
    "XSTestResponseRefusal": ("0_7_xstest_response_refusal.json", ("completion",)),
}


def read_rows(path) -> list[dict]:
    """Rows of a JSON list (.json) or a JSON-lines file (any other name)."""
    path = Path(path)
    if path.suffix != ".json":
        return read_jsonl(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GRError(f"no such data file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GRError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise GRError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); JSON lines need a .jsonl name") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise GRError(f"{path} must hold a JSON list of objects (rows)")
    return rows


def _check_rows(rows: list[dict], origin: str, keys=("instruction", "input", "output")) -> list[dict]:
    for i, row in enumerate(rows):
        missing = [k for k in keys if not isinstance(row.get(k), str)]
        if missing:
            raise GRError(f"{origin}: row {i} lacks the text field(s) {', '.join(missing)} (rows need {', '.join(keys)})")
    return rows


def load_shipped(split: str = "train") -> list[dict]:
    """The dataset shipped in data/ (train or dev)."""
    return _check_rows(read_rows(DATA_DIR / f"{split}.jsonl"), f"data/{split}.jsonl")


def load_guardreasoner_train(splits=tuple(HUB_SPLITS)) -> list[dict]:
    """GuardReasonerTrain's splits from the hub (or huggingface_hub's cache), each row tagged with its source."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    rows = []
    for split in splits:
        if split not in HUB_SPLITS:
            raise GRError(f"unknown GuardReasonerTrain split '{split}': choose from {', '.join(HUB_SPLITS)}")
        file, source = HUB_SPLITS[split]
        try:
            path = hf_hub_download(HUB_TRAIN, file, repo_type="dataset")
        except LocalEntryNotFoundError:
            raise GRError(
                f"{HUB_TRAIN}/{file} is not in the Hugging Face cache and the hub cannot be reached (offline): "
                f"download it once with network access (`hf download {HUB_TRAIN} --repo-type dataset`) or pass a local file"
            ) from None
        rows += [dict(row, source=source) for row in _check_rows(read_rows(path), file)]
    return rows


def load_local(path) -> list[dict]:
    """A local .json/.jsonl file of rows, or a folder laid out like the hub dataset (*Train-R.json files)."""
    path = Path(path)
    if path.is_dir():
        by_file = {file: source for file, source in HUB_SPLITS.values()}
        files = [p for p in sorted(path.iterdir()) if p.name in by_file]
        if not files:
            raise GRError(f"{path} holds none of {', '.join(by_file)}")
        return [dict(row, source=by_file[p.name]) for p in files for row in _check_rows(read_rows(p), str(p))]
    return [dict(row, source=row.get("source", path.stem)) for row in _check_rows(read_rows(path), str(path))]


def load_data(spec: str, split: str = "train") -> list[dict]:
    """`shipped`, `guardreasoner` (or the hub id, optionally `:Split1,Split2`), or a local path."""
    if spec == "shipped":
        return load_shipped(split)
    name, _, chosen = spec.partition(":")
    if name in ("guardreasoner", HUB_TRAIN):
        return load_guardreasoner_train(tuple(chosen.split(",")) if chosen else tuple(HUB_SPLITS))
    return load_local(spec)


def load_benchmark(name: str, folder=None) -> list[dict]:
    """An official benchmark file: from `folder` if given, else our cache, else downloaded into the cache."""
    if name not in BENCHMARKS:
        raise GRError(f"unknown benchmark '{name}': choose from {', '.join(BENCHMARKS)}")
    file = BENCHMARKS[name][0]
    if folder is not None:
        return _check_rows(read_rows(Path(folder) / file), file)
    path = cache_dir() / "benchmarks" / file
    if not path.exists():
        url = BENCHMARK_URL.format(file=file)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                body = response.read()
        except (urllib.error.URLError, OSError) as e:
            raise GRError(
                f"benchmark {name} is not cached at {path} and could not be downloaded from {url} ({e}): "
                "put the file there or pass the folder that holds it"
            ) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(body)
        tmp.replace(path)
    return _check_rows(read_rows(path), file)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt; equal to input_ids on the output and its stop token


def prompt_ids(tokenizer, row: dict, template: str) -> list[int]:
    """The prompt tokens: `raw` is what the released models read (BOS + instruction + "\\n" + input);
    `llama3` is the chat template the authors trained with."""
    if template == "raw":
        return tokenizer.encode(row["instruction"] + "\n" + row["input"], bos=True)
    if template == "llama3":  # the rows' own text stays text, only the template's tokens are special
        return (tokenizer.encode_template(CHAT_HEAD) + tokenizer.encode(row["instruction"] + "\n" + row["input"], bos=False)
                + tokenizer.encode_template(CHAT_TAIL))
    raise ValueError(f"unknown template '{template}' (raw or llama3)")


def stop_id(tokenizer, template: str) -> int:
    """The token that ends an output: `<|eot_id|>` in the chat template, else the tokenizer's eos."""
    token = tokenizer.tok.token_to_id(CHAT_STOP) if template == "llama3" else tokenizer.eos_id
    if token is None:
        raise GRError(f"the tokenizer has no {'<|eot_id|>' if template == 'llama3' else 'eos'} token for the {template} template")
    return token


def encode_sft(tokenizer, row: dict, template: str = "raw", cutoff: int = 2048) -> tuple[Example | None, bool]:
    """One row -> (Example, truncated). Cut at `cutoff` tokens from the right; None when no output is left."""
    prompt = prompt_ids(tokenizer, row, template)
    target = tokenizer.encode(row["output"], bos=False) + [stop_id(tokenizer, template)]
    ids = (prompt + target)[:cutoff]
    if len(ids) <= len(prompt):
        return None, True
    return Example(ids, [IGNORE] * len(prompt) + ids[len(prompt):]), len(prompt) + len(target) > cutoff


def encode_rows(tokenizer, rows: list[dict], template: str = "raw", cutoff: int = 2048) -> tuple[list[Example], int]:
    """Encode many rows; returns the examples and how many rows were cut (rows with no output left are dropped)."""
    examples, cut = [], 0
    for row in rows:
        example, truncated = encode_sft(tokenizer, row, template, cutoff)
        cut += truncated
        if example is not None:
            examples.append(example)
    return examples, cut


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """Batches of indices whose lengths are close (so little padding), in a random order.

    Shuffle, sort each window of 50 batches by length, cut into batches, shuffle the batches: the order
    is random but each batch holds similar lengths. Deterministic in `seed` (a resumed run recomputes it).
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad to the longest: input_ids (B, T) with pad_id, labels (B, T) with IGNORE."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels}
