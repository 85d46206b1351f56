"""Loaders (shipped, hub cache, benchmark files, local files) and tokenization with the prompt masked."""

import json
import shutil
import urllib.error

import pytest

from conftest import SHARED
from gr import GRError
from gr import data
from gr.data import IGNORE, collate, encode_rows, encode_sft, length_grouped_batches, load_benchmark, load_data
from gr.prompts import CHAT_STOP
from gr.tokenizer import train_bpe

BENCH = SHARED / "benchmarks"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rows = data.load_shipped()[:40]
    return train_bpe((r["instruction"] + r["input"] + r["output"] for r in rows), 600, tmp_path_factory.mktemp("tok"))


def test_shipped_splits_load():
    train, dev = load_data("shipped"), load_data("shipped", split="dev")
    assert len(train) >= 400 and len(dev) >= 60
    assert {r["source"] for r in train} == set(data.SOURCES)


def test_benchmarks_from_a_folder_and_from_the_cache(tmp_path, monkeypatch):
    if not BENCH.exists():
        pytest.skip(f"no benchmark files at {BENCH}")
    rows = load_benchmark("SimpleSafetyTests", folder=BENCH)
    assert len(rows) == 100 and rows[0]["output"] == "harmful"
    assert len(load_benchmark("XSTestResponseRefusal", folder=BENCH)) == 449
    monkeypatch.setenv("GR_CACHE", str(tmp_path))
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(BENCH / "0_3_harmbench_prompt.json", tmp_path / "benchmarks")
    assert len(load_benchmark("HarmBenchPrompt")) == 239


def test_benchmark_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GR_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(GRError, match=r"benchmark ToxicChat is not cached at .*0_8_toxic_chat.json and could not be "
                                      r"downloaded from https://raw.githubusercontent.com/yueliu1999/GuardReasoner/main/"
                                      r"data/benchmark/0_8_toxic_chat.json"):
        load_benchmark("ToxicChat")
    with pytest.raises(GRError, match="unknown benchmark"):
        load_benchmark("NoSuchBench")


def fake_dataset_cache(tmp_path, monkeypatch, files: dict):
    """A folder laid out the way huggingface_hub caches yueliu1999/GuardReasonerTrain, and offline mode."""
    import huggingface_hub.constants as c

    repo = tmp_path / "hub" / "datasets--yueliu1999--GuardReasonerTrain"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, rows in files.items():
        (snapshot / name).write_text(json.dumps(rows))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def test_guardreasoner_train_from_the_hub_cache(tmp_path, monkeypatch):
    row = {k: data.load_shipped()[0][k] for k in ("instruction", "input", "output")}
    files = {file: [row] * (i + 1) for i, (file, _) in enumerate(data.HUB_SPLITS.values())}
    fake_dataset_cache(tmp_path, monkeypatch, files)
    rows = load_data("guardreasoner")
    assert [r["source"] for r in rows] == ["wildguard"] + ["aegis"] * 2 + ["beavertails"] * 3 + ["toxicchat"] * 4
    assert [r["source"] for r in load_data("guardreasoner:ToxicChatTrainR,AegisTrainR")] == ["toxicchat"] * 4 + ["aegis"] * 2


def test_guardreasoner_train_offline_and_not_cached(tmp_path, monkeypatch):
    fake_dataset_cache(tmp_path, monkeypatch, {})
    with pytest.raises(GRError, match=r"yueliu1999/GuardReasonerTrain/WildGuardTrain-R.json is not in the Hugging Face "
                                      r"cache and the hub cannot be reached \(offline\)"):
        load_data("guardreasoner")


def test_local_files_and_folders(tmp_path):
    rows = data.load_shipped()[:3]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.json").write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in rows]))
    assert load_data(str(tmp_path / "a.jsonl")) == rows
    assert [r["source"] for r in load_data(str(tmp_path / "b.json"))] == ["b"] * 3
    folder = tmp_path / "hub-like"
    folder.mkdir()
    shutil.copy(tmp_path / "b.json", folder / "AegisTrain-R.json")
    assert [r["source"] for r in load_data(str(folder))] == ["aegis"] * 3
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(GRError, match=r"bad.jsonl:2 is not valid JSON"):
        load_data(str(tmp_path / "bad.jsonl"))
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(GRError, match="row 0 lacks the text field"):
        load_data(str(tmp_path / "c.json"))
    with pytest.raises(GRError, match="no such file"):
        load_data(str(tmp_path / "missing.jsonl"))


def test_prompt_is_masked_and_the_stop_token_is_a_target(tok):
    row = data.load_shipped()[0]
    example, cut = encode_sft(tok, row, "raw", cutoff=4096)
    prompt = tok.encode(row["instruction"] + "\n" + row["input"])
    output = tok.encode(row["output"], bos=False)
    assert not cut and example.input_ids == prompt + output + [tok.eos_id]
    assert example.labels == [IGNORE] * len(prompt) + output + [tok.eos_id]
    chat, _ = encode_sft(tok, row, "llama3", cutoff=4096)
    assert chat.input_ids[0] == tok.bos_id and chat.input_ids[-1] == tok.tok.token_to_id(CHAT_STOP)
    assert chat.labels.count(IGNORE) == len(chat.input_ids) - len(output) - 1


def test_cutoff_cuts_and_counts(tok):
    rows = data.load_shipped()[:5]
    full, cut = encode_rows(tok, rows, "raw", cutoff=4096)
    assert cut == 0
    limit = sorted(len(e.input_ids) for e in full)[2]  # three rows fit, two are longer
    short, cut = encode_rows(tok, rows, "raw", cutoff=limit)
    assert cut == 2 and len(short) == 5 and max(len(e.input_ids) for e in short) == limit
    tiny, cut = encode_rows(tok, rows, "raw", cutoff=10)  # nothing of any output left: dropped, counted
    assert cut == 5 and tiny == []


def test_batches_group_lengths_and_collate_pads():
    lengths = [5, 100, 6, 98, 7, 99, 5, 97]
    batches = length_grouped_batches(lengths, 2, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[1]]) <= 3 for b in batches)
    assert batches == length_grouped_batches(lengths, 2, seed=0) != length_grouped_batches(lengths, 2, seed=1)
    batch = collate([data.Example([1, 2, 3], [IGNORE, 2, 3]), data.Example([4], [IGNORE])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]
