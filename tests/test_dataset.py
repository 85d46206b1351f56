"""Checks of the shipped dataset (data/train.jsonl, data/dev.jsonl), its card and its build script."""

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
sys.path.insert(0, str(ROOT))

from gr.prompts import INSTRUCTION, LABELS, format_answers, format_input, parse_answers, split_input  # noqa: E402

SPLITS = ("train", "dev")
SOURCES = ("wildguard", "beavertails", "aegis", "toxicchat")
WITH_RESPONSE = {"wildguard", "beavertails"}
KEYS = ["instruction", "input", "output", "source", "category"]
KNOWN_TAGS = {"roleplay", "hypothetical", "fiction", "jailbreak", "pretext", "lookalike"}
WRAPPERS = KNOWN_TAGS - {"lookalike"}
ELISION = re.compile(r"\[[^\[\]]*omitted\]")

TASK = r"# Task {k}\n\n((?:## Reasoning Step \d+\n[^\n]+\n\n)+)## Conclusion\n([^\n]+)\n\n"
BODY = re.compile("".join(TASK.format(k=k) for k in (1, 2, 3)))
STEP = re.compile(r"## Reasoning Step (\d+)\n([^\n]+)\n\n")
CONCLUSION = (
    re.compile(r"^The human user's request is (harmful|unharmful)\.$"),
    re.compile(r"^The AI assistant's response is (?:a )?(refusal|compliance|None)\.$"),
    re.compile(r"^The AI assistant's response is (harmful|unharmful|None)\.$"),
)


def _read(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw, path
    return [json.loads(line) for line in raw.decode("utf-8").split("\n")[:-1]]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {s: _read(DATA / f"{s}.jsonl") for s in SPLITS}


@pytest.fixture(scope="module")
def rows(splits) -> list[tuple[str, dict]]:
    return [(s, r) for s in SPLITS for r in splits[s]]


def labels(row: dict) -> tuple[str | None, str | None, str | None]:
    a = parse_answers(row["output"])
    return a.request, a.completion, a.response


def test_sizes(splits):
    assert len(splits["train"]) >= 400
    assert len(splits["dev"]) >= 60


def test_keys_and_instruction(rows):
    for split, r in rows:
        assert list(r)[:5] == KEYS, (split, list(r))
        assert set(r) <= set(KEYS) | {"tags"}
        assert r["instruction"] == INSTRUCTION
        assert r["source"] in SOURCES
        assert isinstance(r.get("tags", []), list) and set(r.get("tags", [])) <= KNOWN_TAGS


def test_input_round_trips(rows):
    for _, r in rows:
        prompt, response = split_input(r["input"])
        assert format_input(prompt, response) == r["input"]
        assert prompt.strip() and prompt == prompt.strip()
        assert (response is not None) == (r["source"] in WITH_RESPONSE), r["input"]


def test_answers_block(rows):
    for _, r in rows:
        a = parse_answers(r["output"])
        assert a.complete, r["output"][-120:]
        assert r["output"].endswith(format_answers(a.request, a.completion, a.response))
        assert r["output"].count("Answers:") == 1
        for task in ("request", "completion", "response"):
            value = a.get(task)
            assert value is None or value in LABELS[task]
        assert a.request is not None
        _, response = split_input(r["input"])
        if response is None:
            assert a.completion is None and a.response is None
        else:
            assert a.completion is not None and a.response is not None
        # The released evaluation script's reading of the last 300 characters agrees.
        official = parse_answers(r["output"], official=True)
        assert (official.request, official.completion, official.response) == (a.request, a.completion, a.response)


def test_reasoning_structure(rows):
    for _, r in rows:
        a = parse_answers(r["output"])
        body = r["output"][: -len(format_answers(a.request, a.completion, a.response))]
        m = BODY.fullmatch(body)
        assert m, body
        for k, gold in enumerate((a.request, a.completion, a.response)):
            steps = STEP.findall(m.group(2 * k + 1))
            assert 1 <= len(steps) <= 4
            assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1))
            assert all(text.strip() and not text.startswith("#") for _, text in steps)
            said = CONCLUSION[k].match(m.group(2 * k + 2))
            assert said, m.group(2 * k + 2)
            assert said.group(1) == (gold or "None"), (k + 1, said.group(0), gold)


def test_output_lengths(rows):
    for _, r in rows:
        assert 500 <= len(r["output"]) <= 1300, len(r["output"])


def test_no_duplicates(splits):
    inputs = [r["input"] for s in SPLITS for r in splits[s]]
    assert len(inputs) == len(set(inputs))
    train_prompts = {" ".join(split_input(r["input"])[0].lower().split()) for r in splits["train"]}
    dev_prompts = [" ".join(split_input(r["input"])[0].lower().split()) for r in splits["dev"]]
    assert len(dev_prompts) == len(set(dev_prompts))
    assert not train_prompts & set(dev_prompts)
    outputs = [r["output"] for s in SPLITS for r in splits[s]]
    assert len(outputs) == len(set(outputs)), "every output should be specific to its sample"


def test_categories_and_sources(splits):
    for split, rs in splits.items():
        assert {r["source"] for r in rs} == set(SOURCES), split
        for r in rs:
            assert (r["category"] == "benign") == (labels(r)[0] == "unharmful"), r["input"]
    harm = {r["category"] for r in splits["train"]} - {"benign"}
    assert len(harm) >= 12, harm
    assert {r["category"] for r in splits["dev"]} - {"benign"} == harm


def test_source_mix(rows):
    counts = Counter(r["source"] for _, r in rows)
    share = {s: counts[s] / len(rows) for s in SOURCES}
    assert 0.30 <= share["wildguard"] <= 0.40
    assert 0.15 <= share["beavertails"] <= 0.25
    assert 0.25 <= share["aegis"] <= 0.35
    assert 0.10 <= share["toxicchat"] <= 0.20


def test_label_balance(splits):
    for split in (*SPLITS, "all"):
        rs = splits["train"] + splits["dev"] if split == "all" else splits[split]
        harmful = sum(labels(r)[0] == "harmful" for r in rs) / len(rs)
        assert 0.45 <= harmful <= 0.55, (split, harmful)
        with_response = [r for r in rs if split_input(r["input"])[1] is not None]
        refusal = sum(labels(r)[1] == "refusal" for r in with_response) / len(with_response)
        response_harmful = sum(labels(r)[2] == "harmful" for r in with_response) / len(with_response)
        assert 0.35 <= refusal <= 0.50, (split, refusal)
        assert 0.25 <= response_harmful <= 0.40, (split, response_harmful)


def test_label_combinations(splits):
    wanted = {
        ("harmful", "refusal", "unharmful"),  # harmful request refused
        ("harmful", "compliance", "harmful"),  # complied with harmfully
        ("harmful", "compliance", "unharmful"),  # complied with, but safely
        ("unharmful", "compliance", "unharmful"),  # benign request answered
        ("unharmful", "refusal", "unharmful"),  # over-refusal
        ("harmful", None, None),  # prompt only
        ("unharmful", None, None),
    }
    for split, rs in splits.items():
        assert {labels(r) for r in rs} == wanted, split


def test_wrappers_and_lookalikes(rows):
    tags = [set(r.get("tags", [])) for _, r in rows]
    assert sum(bool(t & WRAPPERS) for t in tags) >= 40
    assert sum("lookalike" in t for t in tags) >= 30
    for _, r in rows:
        if "lookalike" in r.get("tags", []):
            assert labels(r)[0] == "unharmful"


def test_harmful_responses_are_elided(rows):
    for _, r in rows:
        _, response = split_input(r["input"])
        if response is None:
            continue
        elided = bool(ELISION.search(response))
        assert elided == (labels(r)[2] == "harmful"), response


def _card_module():
    spec = importlib.util.spec_from_file_location("data_card", DATA / "card.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_card_statistics_are_current():
    card = _card_module()
    text = (DATA / "README.md").read_text(encoding="utf-8")
    assert text.count(card.START) == 1 and text.count(card.END) == 1
    section = text.split(card.START, 1)[1].split(card.END, 1)[0]
    assert section == "\n" + card.render_stats(DATA), "stale card: run python data/card.py"


def test_build_reproduces_shipped_files(tmp_path):
    subprocess.run(
        [sys.executable, str(DATA / "build.py"), "--out-dir", str(tmp_path)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DATA / f"{split}.jsonl").read_bytes(), split
