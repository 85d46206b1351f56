"""Regenerate the statistics and the shortcut audit of data/README.md from data/train.jsonl and data/dev.jsonl.

Usage: python data/card.py [--data-dir DIR] [--check]

Everything between `<!-- stats:start -->` and `<!-- stats:end -->` in the card is rewritten from the
jsonl files; nothing there is typed by hand. Labels are read from each output's Answers block with
`gr.prompts.parse_answers`. The audit measures the ways a model could learn the labels without judging:
elision markers, response length, reused reasoning sentences, interactions shared between train and dev,
and how far a bag-of-words classifier gets on the surface words alone (scikit-learn, a test extra).
`--check` only reports whether the card is up to date (exit status 1 when it is stale).
"""

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repository root, for `gr`; this folder, for `build`

from build import ELISION, SOURCES, WRAPPERS, groups, reasoning_words, sentences  # noqa: E402
from gr.files import read_jsonl  # noqa: E402
from gr.prompts import TASKS, parse_answers, split_input  # noqa: E402

START = "<!-- stats:start -->"
END = "<!-- stats:end -->"
SPLITS = ("train", "dev")


def load(data_dir: Path) -> dict[str, list[dict]]:
    return {s: read_jsonl(data_dir / f"{s}.jsonl") for s in SPLITS}


def labels(row: dict) -> tuple[str, str, str]:
    a = parse_answers(row["output"])
    return a.request or "None", a.completion or "None", a.response or "None"


def interaction(row: dict) -> tuple[str, str | None]:
    return split_input(row["input"])


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}%" if d else "n/a"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def length_auroc(rows: list[dict], task: str, positive: str) -> float:
    """AUROC of response length (characters) for telling `positive` from the other label of `task`:
    0.5 when length says nothing, 1.0 (or 0.0) when it separates the labels perfectly."""
    with_response = [r for r in rows if interaction(r)[1] is not None]
    index = TASKS.index(task)
    return roc_auc_score([labels(r)[index] == positive for r in with_response],
                         [len(interaction(r)[1]) for r in with_response])


def sentence_reuse(rows: list[dict]) -> tuple[int, str]:
    """The most rows one reasoning sentence appears in, and that sentence."""
    counts = Counter(s for r in rows for s in set(sentences(r["output"])))
    sentence, n = counts.most_common(1)[0]
    return n, sentence


def split_overlap(train: list[dict], dev: list[dict]) -> dict:
    """Prompts and responses shared by train and dev, and train-dev pairs of near-duplicates (word
    Jaccard >= 0.8 on the prompt or on the response)."""
    shared = {
        f"{field} in both train and dev": len({interaction(r)[i] for r in train} & {interaction(r)[i] for r in dev} - {None})
        for i, field in enumerate(("prompts", "responses"))
    }
    rows = [{"prompt": interaction(r)[0], "response": interaction(r)[1]} for r in train + dev]
    group = groups(rows)
    shared["near-duplicates (word Jaccard >= 0.8) across train and dev"] = len(set(group[:len(train)]) & set(group[len(train):]))
    return shared


def bag_of_words(train: list[dict], dev: list[dict]) -> dict[str, tuple[float, float]]:
    """Per task: dev accuracy of a logistic regression on the input's word counts (prompt and response),
    trained on train, and the majority-class accuracy on dev."""
    result = {}
    for i, task in enumerate(TASKS):
        def text(r):
            prompt, response = interaction(r)
            return prompt + "\n" + (response or "")

        a = [(text(r), labels(r)[i]) for r in train if labels(r)[i] != "None"]
        b = [(text(r), labels(r)[i]) for r in dev if labels(r)[i] != "None"]
        vectorizer = CountVectorizer()
        classifier = LogisticRegression(max_iter=5000).fit(vectorizer.fit_transform([x for x, _ in a]), [y for _, y in a])
        predicted = classifier.predict(vectorizer.transform([x for x, _ in b]))
        gold = [y for _, y in b]
        accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
        result[task] = (accuracy, max(Counter(gold).values()) / len(gold))
    return result


def render_stats(data_dir: Path = HERE) -> str:
    data = load(data_dir)
    everything = [r for s in SPLITS for r in data[s]]
    cols = list(SPLITS) + ["all"]
    parts = {**data, "all": everything}
    lines: list[str] = []

    lines += ["### Samples per split and source style", ""]
    rows = [[src] + [sum(r["source"] == src for r in parts[c]) for c in cols] + [_pct(sum(r["source"] == src for r in everything), len(everything))]
            for src in SOURCES]
    rows.append(["**total**"] + [len(parts[c]) for c in cols] + ["100%"])
    lines += _table(["source style"] + cols + ["share"], rows)

    lines += ["### Label balance", ""]
    rows = []
    for c in cols:
        rs = parts[c]
        with_resp = [r for r in rs if interaction(r)[1] is not None]
        rows.append([c, _pct(sum(labels(r)[0] == "harmful" for r in rs), len(rs)), _pct(len(with_resp), len(rs)),
                     _pct(sum(labels(r)[1] == "refusal" for r in with_resp), len(with_resp)),
                     _pct(sum(labels(r)[2] == "harmful" for r in with_resp), len(with_resp))])
    lines += _table(["split", "request harmful", "with an AI response", "refusal (of those)", "response harmful (of those)"], rows)

    lines += ["### Label combinations (request / completion / response)", ""]
    combos = Counter(labels(r) for r in everything)
    rows = [[" / ".join(k)] + [sum(labels(r) == k for r in parts[c]) for c in cols] for k in sorted(combos)]
    lines += _table(["labels"] + cols, rows)

    lines += ["### Categories", ""]
    cats = sorted({r["category"] for r in everything}, key=lambda k: (k == "benign", k))
    rows = [[k] + [sum(r["category"] == k for r in parts[c]) for c in cols] for k in cats]
    lines += _table(["category"] + cols, rows)

    lines += ["### Adversarial wrappers, look-alikes and kinds of refusal", ""]
    rows = []
    for t in (*WRAPPERS, "lookalike", "partial_refusal", "redirection"):
        rows.append([t] + [sum(t in r["tags"] for r in parts[c]) for c in cols])
    lines += _table(["tag"] + cols, rows)
    wrapped = [r for r in everything if set(r["tags"]) & set(WRAPPERS)]
    harmful = sum(labels(r)[0] == "harmful" for r in wrapped)
    lines += [f"Wrapped requests: {len(wrapped)}, of which {harmful} harmful and {len(wrapped) - harmful} unharmful.", ""]

    lines += ["### Lengths", ""]
    rows = []
    for c in cols:
        rs = parts[c]
        steps = [r["output"].count("## Reasoning Step ") for r in rs]
        reasoning = [reasoning_words(r["output"]) for r in rs]
        responses = [len(interaction(r)[1]) for r in rs if interaction(r)[1] is not None]
        prompts = [len(interaction(r)[0]) for r in rs]
        rows.append([c, f"{statistics.mean(steps):.2f} ({min(steps)}-{max(steps)})",
                     f"{statistics.mean(reasoning):.0f} ({min(reasoning)}-{max(reasoning)})",
                     f"{statistics.median(prompts):.0f} ({min(prompts)}-{max(prompts)})",
                     f"{statistics.median(responses):.0f} ({min(responses)}-{max(responses)})"])
    lines += _table(["split", "reasoning steps per row, mean (range)", "reasoning words per row, mean (range)",
                     "prompt characters, median (range)", "response characters, median (range)"], rows)

    lines += ["### Shortcut audit", ""]
    markers = sum(bool(ELISION.search(text or "")) for r in everything for text in interaction(r))
    reuse, sentence = sentence_reuse(everything)
    overlap = split_overlap(data["train"], data["dev"])
    rows = [
        ["elision markers ([... omitted] and the like) in prompts or responses", markers, "0"],
        ["AUROC of response length: harmful vs unharmful response", f"{length_auroc(everything, 'response', 'harmful'):.3f}", "0.30-0.70"],
        ["AUROC of response length: refusal vs compliance", f"{length_auroc(everything, 'completion', 'refusal'):.3f}", "0.30-0.70"],
        ["most rows sharing one reasoning sentence", f"{reuse} ({_pct(reuse, len(everything))})", f"at most 1% ({len(everything) // 100})"],
        *[[name, n, "0"] for name, n in overlap.items()],
    ]
    lines += _table(["check", "value", "required"], rows)
    if reuse > 1:
        lines += [f"The most reused reasoning sentence: \"{sentence}\"", ""]
    lines += ["Bag-of-words classifier (logistic regression on the word counts of prompt and response, trained on",
              "train, scored on dev; printed only, the goal is under 75%):", ""]
    bow = bag_of_words(data["train"], data["dev"])
    lines += _table(["task", "dev accuracy", "majority class"], [[t, _pct(round(a * 1000), 1000), _pct(round(m * 1000), 1000)]
                                                                 for t, (a, m) in bow.items()])
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
