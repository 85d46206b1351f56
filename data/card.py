"""Regenerate the statistics section of data/README.md from data/train.jsonl and data/dev.jsonl.

Usage: python data/card.py [--data-dir DIR] [--check]

Everything between `<!-- stats:start -->` and `<!-- stats:end -->` in the card is rewritten from the
jsonl files; nothing there is typed by hand. Labels are read from each output's Answers block with
`gr.prompts.parse_answers`, the same parser the rest of the project uses. `--check` only reports whether
the card is up to date (exit status 1 when it is stale).
"""

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, for `gr`

from gr.prompts import parse_answers, split_input  # noqa: E402

START = "<!-- stats:start -->"
END = "<!-- stats:end -->"
SPLITS = ("train", "dev")
SOURCES = ("wildguard", "beavertails", "aegis", "toxicchat")
WRAPPERS = ("roleplay", "hypothetical", "fiction", "jailbreak", "pretext")


def load(data_dir: Path) -> dict[str, list[dict]]:
    return {
        s: [json.loads(line) for line in (data_dir / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]
        for s in SPLITS
    }


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}%" if d else "n/a"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _labels(row: dict) -> tuple[str, str, str]:
    a = parse_answers(row["output"])
    return a.request or "None", a.completion or "None", a.response or "None"


def render_stats(data_dir: Path = HERE) -> str:
    data = load(data_dir)
    everything = [r for s in SPLITS for r in data[s]]
    cols = list(SPLITS) + ["all"]
    parts = {**data, "all": everything}
    lines: list[str] = []

    lines += ["### Samples per split and source style", ""]
    rows = [[src] + [sum(r["source"] == src for r in parts[c]) for c in cols] for src in SOURCES]
    rows.append(["**total**"] + [len(parts[c]) for c in cols])
    lines += _table(["source style"] + cols, rows)

    lines += ["### Labels per task", ""]
    rows = []
    for i, (task, values) in enumerate(
        (("request", ("harmful", "unharmful")), ("completion", ("refusal", "compliance", "None")),
         ("response", ("harmful", "unharmful", "None")))
    ):
        for v in values:
            rows.append([f"{task}: {v}"] + [sum(_labels(r)[i] == v for r in parts[c]) for c in cols])
    lines += _table(["label"] + cols, rows)

    lines += ["### Label balance", ""]
    rows = []
    for c in cols:
        rs = parts[c]
        with_resp = [r for r in rs if split_input(r["input"])[1] is not None]
        rows.append([
            c,
            _pct(sum(_labels(r)[0] == "harmful" for r in rs), len(rs)),
            len(with_resp),
            _pct(sum(_labels(r)[1] == "refusal" for r in with_resp), len(with_resp)),
            _pct(sum(_labels(r)[2] == "harmful" for r in with_resp), len(with_resp)),
        ])
    lines += _table(
        ["split", "request harmful", "samples with a response", "refusal (of those)", "response harmful (of those)"],
        rows,
    )

    lines += ["### Label combinations (request / completion / response)", ""]
    combos = Counter(_labels(r) for r in everything)
    rows = [[" / ".join(k)] + [sum(_labels(r) == k for r in parts[c]) for c in cols] for k in sorted(combos)]
    lines += _table(["labels"] + cols, rows)

    lines += ["### Categories", ""]
    cats = sorted({r["category"] for r in everything}, key=lambda k: (k == "benign", k))
    rows = [[k] + [sum(r["category"] == k for r in parts[c]) for c in cols] for k in cats]
    lines += _table(["category"] + cols, rows)
    n_harm = sum(k != "benign" for k in cats)
    lines += [f"{n_harm} harm categories, plus `benign` for unharmful requests.", ""]

    lines += ["### Adversarial wrappers and benign look-alikes", ""]
    rows = []
    for t in WRAPPERS + ("lookalike",):
        rows.append([t] + [sum(t in r.get("tags", []) for r in parts[c]) for c in cols])
    rows.append(["any wrapper"] + [sum(any(t in WRAPPERS for t in r.get("tags", [])) for r in parts[c]) for c in cols])
    lines += _table(["tag"] + cols, rows)
    wrapped = [r for r in everything if any(t in WRAPPERS for t in r.get("tags", []))]
    lines += [
        f"Wrapped requests that are harmful: {sum(_labels(r)[0] == 'harmful' for r in wrapped)} of {len(wrapped)}. "
        f"Look-alikes needlessly refused: "
        f"{sum('lookalike' in r.get('tags', []) and _labels(r)[1] == 'refusal' for r in everything)}.",
        "",
    ]

    lines += ["### Lengths (characters)", ""]
    rows = []
    for c in cols:
        rs = parts[c]
        out = [len(r["output"]) for r in rs]
        inp = [len(r["input"]) for r in rs]
        steps = [r["output"].count("## Reasoning Step ") for r in rs]
        rows.append([
            c, min(out), int(statistics.median(out)), round(statistics.mean(out)), max(out),
            int(statistics.median(inp)), max(inp), f"{statistics.mean(steps):.2f}", sum(steps),
        ])
    lines += _table(
        ["split", "output min", "output median", "output mean", "output max", "input median", "input max",
         "reasoning steps per sample", "reasoning steps total"],
        rows,
    )
    return "\n".join(lines).rstrip("\n") + "\n"


def render_card(card_text: str, stats: str) -> str:
    head, sep1, rest = card_text.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep1 or not sep2:
        raise ValueError(f"card lacks the {START} ... {END} markers")
    return f"{head}{START}\n{stats}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=HERE)
    ap.add_argument("--check", action="store_true", help="exit 1 if the card's statistics are stale")
    args = ap.parse_args(argv)
    card = args.data_dir / "README.md"
    old = card.read_text(encoding="utf-8")
    new = render_card(old, render_stats(args.data_dir))
    if args.check:
        print("card is up to date" if new == old else "card statistics are stale: run python data/card.py")
        return 0 if new == old else 1
    if new != old:
        card.write_text(new, encoding="utf-8")
        print(f"updated {card}")
    else:
        print(f"{card} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
