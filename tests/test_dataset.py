"""Checks of the shipped dataset (data/train.jsonl, data/dev.jsonl): format, mix, labels, the shortcut audit,
its card, and that data/build.py reproduces it from data/authored/ without writing any text."""

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def _module(name: str):
    sys.path.insert(0, str(DATA))
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _module("build")
card = _module("card")

from gr.files import read_jsonl  # noqa: E402
from gr.prompts import INSTRUCTION, format_input, parse_answers, split_input  # noqa: E402

SPLITS = ("train", "dev")
COMBINATIONS = [  # the seven label combinations of the paper's data, each taught with at least 40 train rows
    ("harmful", "refusal", "unharmful"), ("harmful", "compliance", "harmful"), ("harmful", "compliance", "unharmful"),
    ("unharmful", "compliance", "unharmful"), ("unharmful", "refusal", "unharmful"), ("harmful", None, None),
    ("unharmful", None, None),
]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {s: read_jsonl(DATA / f"{s}.jsonl") for s in SPLITS}


@pytest.fixture(scope="module")
def rows(splits) -> list[dict]:
    return splits["train"] + splits["dev"]


def labels(row: dict) -> tuple:
    a = parse_answers(row["output"])
    return a.request, a.completion, a.response


def authored(row: dict) -> dict:
    prompt, response = split_input(row["input"])
    return {"id": row["id"], "source": row["source"], "category": row["category"], "tags": row["tags"],
            "prompt": prompt, "response": response, "output": row["output"]}


def test_sizes(splits):
    assert len(splits["train"]) >= 1200 and len(splits["dev"]) >= 250


def test_every_row_is_well_formed(rows):
    for row in rows:
        assert list(row) == ["instruction", "input", "output", "source", "category", "tags", "id"]
        assert row["instruction"] == INSTRUCTION
        prompt, response = split_input(row["input"])
        assert format_input(prompt, response) == row["input"]
        assert build.problems(authored(row)) == [], row["id"]
        # The released evaluation script's reading of the last 300 characters agrees with ours.
        official = parse_answers(row["output"], official=True)
        assert (official.request, official.completion, official.response) == labels(row)


def test_no_duplicates(rows):
    assert len({r["input"] for r in rows}) == len(rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_source_mix_is_near_guardreasonertrains(rows):
    share = {s: n / len(rows) for s, n in Counter(r["source"] for r in rows).items()}
    assert 0.55 <= share["wildguard"] <= 0.65 and 0.15 <= share["beavertails"] <= 0.25
    assert 0.08 <= share["aegis"] <= 0.16 and 0.05 <= share["toxicchat"] <= 0.11
    assert sum(split_input(r["input"])[1] is not None for r in rows) >= 0.8 * len(rows)


def test_label_balance(splits):
    for split in (*SPLITS, "all"):
        rs = splits["train"] + splits["dev"] if split == "all" else splits[split]
        assert 0.40 <= sum(labels(r)[0] == "harmful" for r in rs) / len(rs) <= 0.60, split
        with_response = [r for r in rs if split_input(r["input"])[1] is not None]
        assert sum(labels(r)[1] == "refusal" for r in with_response) >= 0.25 * len(with_response), split
        assert sum(labels(r)[2] == "harmful" for r in with_response) >= 0.25 * len(with_response), split


def test_label_combinations(splits):
    train = Counter(labels(r) for r in splits["train"])
    for combination in COMBINATIONS:
        assert train[combination] >= 40, (combination, train[combination])
        assert any(labels(r) == combination for r in splits["dev"]), combination


def test_wrappers_lookalikes_and_kinds_of_refusal(rows):
    wrapped = [r for r in rows if set(r["tags"]) & set(build.WRAPPERS)]
    assert sum(labels(r)[0] == "harmful" for r in wrapped) >= 100
    assert sum(labels(r)[0] == "unharmful" for r in wrapped) >= 100  # a wrapper is no harm signal by itself
    assert sum("lookalike" in r["tags"] for r in rows) >= 100
    assert all(labels(r)[0] == "unharmful" for r in rows if "lookalike" in r["tags"])
    refusals = [r for r in rows if labels(r)[1] == "refusal"]
    assert sum("partial_refusal" in r["tags"] for r in refusals) >= 40
    assert sum("redirection" in r["tags"] for r in refusals) >= 40
    over_refusals = [r for r in refusals if labels(r)[0] == "unharmful"]
    safe_answers = [r for r in rows if labels(r) == ("harmful", "compliance", "unharmful")]
    assert len(over_refusals) >= 100 and len(safe_answers) >= 100
    harm = {r["category"] for r in rows} - {"benign"}
    assert len(harm) == 13


def test_shortcut_audit(splits, rows):
    assert not any(build.ELISION.search(text or "") for r in rows for text in split_input(r["input"]))
    assert 0.30 <= card.length_auroc(rows, "response", "harmful") <= 0.70
    assert 0.30 <= card.length_auroc(rows, "completion", "refusal") <= 0.70
    reuse, _ = card.sentence_reuse(rows)
    assert reuse <= len(rows) // 100
    assert set(card.split_overlap(splits["train"], splits["dev"]).values()) == {0}


def test_card_statistics_are_current():
    text = (DATA / "README.md").read_text(encoding="utf-8")
    assert text.count(card.START) == 1 and text.count(card.END) == 1
    section = text.split(card.START, 1)[1].split(card.END, 1)[0]
    assert section == "\n" + card.render_stats(DATA), "stale card: run python data/card.py"


def test_build_reproduces_shipped_files(tmp_path):
    result = subprocess.run([sys.executable, str(DATA / "build.py"), "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DATA / f"{split}.jsonl").read_bytes(), split


def test_build_rejects_a_bad_row(tmp_path):
    row = build.read_authored([sorted((DATA / "authored").glob("*.jsonl"))[0]])[0]
    bad = [dict(row, output=row["output"].replace("Request: ", "Request:  ", 1)),
           dict(row, id="x2", output=row["output"].replace("## Conclusion", "## Verdict", 1)),
           dict(row, id="x3", response="Sure: [steps omitted]")]
    found = build.check(bad)
    assert any("Answers block" in p for p in found) and any("'# Task k' sections" in p for p in found)
    assert any("elision marker" in p for p in found)
