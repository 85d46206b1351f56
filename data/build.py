"""Check, de-duplicate and split the authored dataset (paper section 3) into data/train.jsonl and data/dev.jsonl.

The rows of data/authored/*.jsonl were written one by one, the way the paper's teacher wrote
GuardReasonerTrain: read the interaction, decide its labels by the conventions in data/README.md, then write
the step-by-step reasoning about *that* interaction and end with the Answers block. This script writes no
text. It checks every row against the format and the card's rules, drops rows whose interaction is already
in the set, keeps near-duplicates together in one split, and puts one group in six of every (source, label
combination) into dev.

    python data/build.py                       # data/authored/*.jsonl -> data/train.jsonl, data/dev.jsonl
    python data/build.py --check FILE [FILE]   # check authored files; print their problems and statistics
"""

import argparse
import hashlib
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, for `gr`

from gr.files import read_jsonl, write_jsonl  # noqa: E402
from gr.prompts import INSTRUCTION, format_answers, format_input, parse_answers  # noqa: E402

SOURCES = ("wildguard", "beavertails", "aegis", "toxicchat")
CATEGORIES = ("benign", "violence", "weapons", "extremism", "cybercrime", "fraud", "theft", "hate", "harassment",
              "privacy", "misinformation", "drugs", "self_harm", "sexual")
WRAPPERS = ("roleplay", "hypothetical", "fiction", "obfuscation", "split_payload", "injection", "pretext")
TAGS = (*WRAPPERS, "lookalike", "partial_refusal", "redirection")
KEYS = ("id", "source", "category", "tags", "prompt", "response", "output")
DEV_EVERY = 6  # one group in six goes to dev

# One "# Task k" section: numbered one-paragraph steps, then the conclusion sentence.
_TASK = r"# Task {k}\n\n((?:## Reasoning Step \d+\n[^\n#][^\n]*\n\n)+)## Conclusion\n([^\n]+)\n\n"
BODY = re.compile("".join(_TASK.format(k=k) for k in (1, 2, 3)) + r"---\n\n")
STEP = re.compile(r"## Reasoning Step (\d+)\n([^\n]+)\n\n")
CONCLUSIONS = (
    {"harmful": "The human user's request is harmful.", "unharmful": "The human user's request is unharmful."},
    {"refusal": "The AI assistant's response is a refusal.", "compliance": "The AI assistant's response is compliance.",
     None: "The AI assistant's response is None."},
    {"harmful": "The AI assistant's response is harmful.", "unharmful": "The AI assistant's response is unharmful.",
     None: "The AI assistant's response is None."},
)
# Bracketed elisions ("[steps omitted]") would tell a model which responses are harmful without reading them.
ELISION = re.compile(r"\[[^\]\n]{0,40}\b(omitted|redacted|removed|censored|elided|withheld|details|steps|content)\b[^\]\n]{0,40}\]", re.I)
SENTENCE = re.compile(r"(?<=[.!?])\s+")
MIN_WORDS, MAX_WORDS, MIN_STEPS, MAX_STEPS = 80, 220, 3, 9


def labels(row: dict) -> tuple[str, str | None, str | None]:
    """(request, completion, response) from the row's Answers block; None where there is no response."""
    a = parse_answers(row["output"])
    return a.request, a.completion, a.response


def steps(output: str) -> list[list[str]]:
    """The step texts of each task (empty lists when the output is malformed)."""
    m = BODY.match(output)
    return [[text for _, text in STEP.findall(m.group(2 * k + 1))] for k in range(3)] if m else [[], [], []]


def reasoning_words(output: str) -> int:
    """Words of the steps and conclusions, headings and the Answers block left out."""
    return sum(len(text.split()) for task in steps(output) for text in task) + 18  # three six-word conclusions


def sentences(output: str) -> list[str]:
    """Reasoning sentences (of the steps, not the fixed conclusions), normalized for counting reuse."""
    return [" ".join(s.lower().split()) for task in steps(output) for text in task for s in SENTENCE.split(text) if s]


def problems(row: dict) -> list[str]:
    """Everything wrong with one authored row, as short messages (none: the row is fine)."""
    if not isinstance(row, dict) or tuple(row) != KEYS:
        return [f"keys must be exactly {', '.join(KEYS)}, in that order"]
    found = []
    if row["source"] not in SOURCES:
        found.append(f"source {row['source']!r} is not one of {', '.join(SOURCES)}")
    if row["category"] not in CATEGORIES:
        found.append(f"category {row['category']!r} is not one of {', '.join(CATEGORIES)}")
    if not isinstance(row["tags"], list) or not set(row["tags"]) <= set(TAGS):
        found.append(f"tags must be a list drawn from {', '.join(TAGS)}")
    prompt, response = row["prompt"], row["response"]
    if not isinstance(prompt, str) or not prompt.strip() or prompt != prompt.strip():
        found.append("prompt must be non-empty text without surrounding whitespace")
    if response is not None and (not isinstance(response, str) or not response.strip() or response != response.strip()
                                 or response == "None"):
        found.append("response must be null or non-empty text without surrounding whitespace")
    for name, text in (("prompt", prompt), ("response", response)):
        if isinstance(text, str) and ELISION.search(text):
            found.append(f"{name} holds an elision marker {ELISION.search(text).group(0)!r}")
    output = row["output"]
    if not isinstance(output, str):
        return found + ["output must be text"]
    a = parse_answers(output)
    if not a.complete or output.count("Answers:") != 1 or not output.endswith(format_answers(a.request, a.completion, a.response)):
        return found + ["output must end in exactly one Answers block as gr.prompts.format_answers writes it"]
    m = BODY.match(output)
    if not m or m.end() + len(format_answers(a.request, a.completion, a.response)) - len("---\n\n") != len(output):
        return found + ["output is not '# Task k' sections of '## Reasoning Step n' paragraphs and a '## Conclusion'"]
    gold = (a.request, a.completion, a.response)
    if a.request is None:
        found.append("Request must be harmful or unharmful")
    if (response is None) != (a.completion is None) or (response is None) != (a.response is None):
        found.append("Completion and Response are None exactly when there is no AI response")
    counts = []
    for k in range(3):
        numbers = [int(n) for n, _ in STEP.findall(m.group(2 * k + 1))]
        counts.append(len(numbers))
        if numbers != list(range(1, len(numbers) + 1)):
            found.append(f"Task {k + 1}: steps must be numbered 1, 2, ...")
        if m.group(2 * k + 2) != CONCLUSIONS[k].get(gold[k]):
            found.append(f"Task {k + 1}: the conclusion must read {CONCLUSIONS[k].get(gold[k])!r}")
    if not MIN_STEPS <= sum(counts) <= MAX_STEPS:
        found.append(f"{sum(counts)} reasoning steps; a row has {MIN_STEPS} to {MAX_STEPS}")
    words = reasoning_words(output)
    if not MIN_WORDS <= words <= MAX_WORDS:
        found.append(f"{words} reasoning words; a row has {MIN_WORDS} to {MAX_WORDS}")
    if "lookalike" in row["tags"] and a.request != "unharmful":
        found.append("a lookalike request is unharmful")
    if (row["category"] == "benign") != (a.request == "unharmful"):
        found.append("category is 'benign' exactly when the request is unharmful")
    return found


def combination(row: dict) -> str:
    return "-".join(str(v) for v in labels(row))


def read_authored(paths) -> list[dict]:
    rows = []
    for path in paths:
        rows += read_jsonl(path)
    return rows


def check(rows: list[dict], where: str = "") -> list[str]:
    """Problems of every row and of the set: duplicate ids, interactions and reused reasoning sentences."""
    found = [f"{where}{row.get('id', i) if isinstance(row, dict) else i}: {p}" for i, row in enumerate(rows) for p in problems(row)]
    ids = Counter(row.get("id") for row in rows if isinstance(row, dict))
    found += [f"{where}id {i!r} is used {n} times" for i, n in ids.items() if n > 1]
    return found


def interaction_key(row: dict) -> str:
    return " ".join((row["prompt"] + "\x00" + (row["response"] or "")).lower().split())


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def groups(rows: list[dict], threshold: float = 0.8) -> list[int]:
    """Group of each row: rows sharing a prompt or a response, or whose prompts (or responses) are
    near-duplicates (word Jaccard >= threshold), form one group, so they land in the same split."""
    parent = list(range(len(rows)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for field in ("prompt", "response"):
        bags = sorted(((len(w), i, w) for i, r in enumerate(rows) if r[field] for w in [words(r[field])]))
        for a, (size, i, w) in enumerate(bags):
            for other, j, v in bags[a + 1:]:
                if size < threshold * other:  # Jaccard <= size / other: no larger bag can reach the threshold
                    break
                if jaccard(w, v) >= threshold:
                    parent[find(i)] = find(j)
    return [find(i) for i in range(len(rows))]


def split(rows: list[dict]) -> tuple[list[dict], list[dict], int]:
    """(train, dev, dropped duplicates): one group in DEV_EVERY of each (source, combination) goes to dev.

    A group's order is a hash of its first row's id, so the split does not depend on file order."""
    seen, kept = set(), []
    for row in rows:
        key = interaction_key(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    group = groups(kept)
    members = defaultdict(list)
    for i, g in enumerate(group):
        members[g].append(i)
    strata = defaultdict(list)
    for g, idx in members.items():
        first = kept[idx[0]]
        strata[(first["source"], combination(first))].append(g)
    dev_groups = set()
    for key in sorted(strata):
        ordered = sorted(strata[key], key=lambda g: hashlib.sha256(kept[members[g][0]]["id"].encode()).hexdigest())
        dev_groups.update(ordered[DEV_EVERY // 2::DEV_EVERY])
    train = [kept[i] for i in range(len(kept)) if group[i] not in dev_groups]
    dev = [kept[i] for i in range(len(kept)) if group[i] in dev_groups]
    return train, dev, len(rows) - len(kept)


def training_row(row: dict) -> dict:
    """A GuardReasonerTrain row (instruction, input, output) plus what describes it (source, category, tags, id)."""
    return {"instruction": INSTRUCTION, "input": format_input(row["prompt"], row["response"]), "output": row["output"],
            "source": row["source"], "category": row["category"], "tags": row["tags"], "id": row["id"]}


def describe(rows: list[dict]) -> str:
    """Per label combination: rows, and the mean response length in characters."""
    lines = []
    by_combo = defaultdict(list)
    for row in rows:
        by_combo[combination(row)].append(row)
    for combo, rs in sorted(by_combo.items()):
        lengths = [len(r["response"]) for r in rs if r["response"]]
        mean = f", response {sum(lengths) / len(lengths):.0f} chars on average" if lengths else ""
        lines.append(f"  {combo:32} {len(rs):4d} rows{mean}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", nargs="+", metavar="FILE", help="only check these authored files")
    parser.add_argument("--out-dir", default=str(HERE), help="where train.jsonl and dev.jsonl go")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.check] if args.check else sorted((HERE / "authored").glob("*.jsonl"))
    rows = read_authored(paths)
    found = check(rows)
    reuse = Counter(s for row in rows if not problems(row) for s in set(sentences(row["output"])))
    limit = max(2, len(rows) // 100)
    found += [f"sentence in {n} rows (at most {limit}): {s!r}" for s, n in reuse.most_common() if n > limit]
    for line in found:
        print(line)
    if args.check:
        print(f"{len(rows)} rows, {len(found)} problems\n{describe([r for r in rows if not problems(r)])}")
        return 1 if found else 0
    if found:
        print(f"{len(found)} problems: nothing written", file=sys.stderr)
        return 1
    train, dev, dropped = split(rows)
    out = Path(args.out_dir)
    write_jsonl(out / "train.jsonl", [training_row(r) for r in train])
    write_jsonl(out / "dev.jsonl", [training_row(r) for r in dev])
    print(f"{len(train)} train rows, {len(dev)} dev rows, {dropped} duplicate interactions dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
