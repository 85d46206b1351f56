"""The hand-authored seed interactions behind the shipped dataset, and their train/dev split.

Seeds live in `data/seed_text/*.txt`, written by hand for this project. One seed is a block:

    @ <source> <category> <labels> [tag ...]
    P: the user's prompt
    R: the AI assistant's response                (only for prompt+response sources)
    G: what the user asks, fitting "The human user asks ___."
    W: one or two sentences on why the request is harmful or unharmful
    D: what the response does, fitting "The AI assistant ___."   (only with R)
    X: one sentence on why the response is harmful or unharmful   (only with R)

`<labels>` is three characters: request (h/u), completion (r/c/-), response (h/u/-), e.g. `hru` for a
harmful request that was refused, `h--` for a harmful prompt with no response. Blocks are separated by
blank lines; lines starting with `#` are comments; the two characters `\\n` inside a text stand for a
line break. Tags mark adversarial wrappers (`roleplay`, `hypothetical`, `fiction`, `jailbreak`,
`pretext`) and benign look-alikes (`lookalike`).

Harmful AI responses never carry operational detail: the harmful part is elided with a bracketed marker
ending in `omitted]`, e.g. `[steps omitted]`. `load_seeds()` checks all of this and fails loudly.

The split is deterministic and stratified: each (source, labels) group gives one seed in six (rounded
up) to dev, chosen to keep the shares of categories, wrappers and look-alikes in dev about equal; see `split_seeds`.
"""

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SEED_DIR = Path(__file__).resolve().parent / "seed_text"

SOURCES = ("wildguard", "beavertails", "aegis", "toxicchat")
WITH_RESPONSE = ("wildguard", "beavertails")
HARM_CATEGORIES = (
    "violence", "weapons", "self-harm", "hate", "harassment", "sexual", "drugs", "cybercrime",
    "fraud", "privacy", "misinformation", "extremism", "theft",
)
CATEGORIES = HARM_CATEGORIES + ("benign",)
WRAPPERS = ("roleplay", "hypothetical", "fiction", "jailbreak", "pretext")
TAGS = WRAPPERS + ("lookalike",)
ELISION = re.compile(r"\[[^\[\]]*omitted\]")
DEV_EVERY = 6

_REQ = {"h": "harmful", "u": "unharmful"}
_COMP = {"r": "refusal", "c": "compliance", "-": None}
_RESP = {"h": "harmful", "u": "unharmful", "-": None}


@dataclass(frozen=True)
class Seed:
    source: str
    category: str
    prompt: str
    response: str | None
    request_label: str
    completion_label: str | None
    response_label: str | None
    gist: str  # G
    why: str  # W
    does: str | None  # D
    response_why: str | None  # X
    tags: tuple[str, ...] = field(default_factory=tuple)
    where: str = ""  # file:line, for error messages

    @property
    def key(self) -> str:
        return hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()


def _text(value: str) -> str:
    return value.strip().replace("\\n", "\n")


def parse_block(lines: list[str], where: str) -> Seed:
    head = lines[0].split()
    if len(head) < 4 or head[0] != "@":
        raise ValueError(f"{where}: bad header {lines[0]!r}")
    _, source, category, labels, *tags = head
    fields: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(": ")
        if not sep or key not in "PRGWDX" or len(key) != 1:
            raise ValueError(f"{where}: bad line {line!r}")
        if key in fields:
            raise ValueError(f"{where}: field {key} given twice")
        fields[key] = _text(value)
    if len(labels) != 3 or labels[0] not in _REQ or labels[1] not in _COMP or labels[2] not in _RESP:
        raise ValueError(f"{where}: bad labels {labels!r}")
    seed = Seed(
        source=source,
        category=category,
        prompt=fields.get("P", ""),
        response=fields.get("R"),
        request_label=_REQ[labels[0]],
        completion_label=_COMP[labels[1]],
        response_label=_RESP[labels[2]],
        gist=fields.get("G", ""),
        why=fields.get("W", ""),
        does=fields.get("D"),
        response_why=fields.get("X"),
        tags=tuple(tags),
        where=where,
    )
    check_seed(seed)
    return seed


def check_seed(s: Seed) -> None:
    def fail(msg: str):
        raise ValueError(f"{s.where}: {msg}")

    if s.source not in SOURCES:
        fail(f"unknown source {s.source!r}")
    if s.category not in CATEGORIES:
        fail(f"unknown category {s.category!r}")
    if (s.category == "benign") != (s.request_label == "unharmful"):
        fail("category must be 'benign' exactly when the request is unharmful")
    for t in s.tags:
        if t not in TAGS:
            fail(f"unknown tag {t!r}")
    if len(set(s.tags)) != len(s.tags):
        fail("repeated tag")
    if "lookalike" in s.tags and s.request_label != "unharmful":
        fail("a look-alike must be an unharmful request")
    if not s.prompt or not s.gist or not s.why:
        fail("P, G and W are required")
    has_response = s.source in WITH_RESPONSE
    if has_response:
        if s.response is None or s.does is None or s.response_why is None:
            fail("prompt+response sources need R, D and X")
        if s.completion_label is None or s.response_label is None:
            fail("prompt+response sources need completion and response labels")
        if s.response == "None":
            fail("a response may not be the literal None")
        if s.completion_label == "refusal" and s.response_label == "harmful":
            fail("a refusal is never a harmful response in this dataset")
        if s.request_label == "unharmful" and s.response_label == "harmful":
            fail("benign requests get unharmful responses in this dataset")
        elided = bool(ELISION.search(s.response))
        if (s.response_label == "harmful") != elided:
            fail("harmful responses, and only they, carry an '[... omitted]' elision marker")
    else:
        if s.response is not None or s.does is not None or s.response_why is not None:
            fail("prompt-only sources take no R, D or X")
        if s.completion_label is not None or s.response_label is not None:
            fail("prompt-only sources have labels like 'h--'")
    for name, text in (("P", s.prompt), ("R", s.response or "")):
        if "AI assistant:" in text or "Human user:" in text or re.search(r"answers:", text, re.I):
            fail(f"{name} contains text that would confuse the input/answer format")
        if text != text.strip():
            fail(f"{name} has leading or trailing whitespace")
    if ELISION.search(s.prompt):
        fail("elision markers belong in responses only")
    for name, text in (("G", s.gist), ("D", s.does or "")):
        if text.endswith("."):
            fail(f"{name} is a phrase and must not end with a period")
    for name, text in (("W", s.why), ("X", s.response_why or "")):
        if text and not text.endswith("."):
            fail(f"{name} is a sentence and must end with a period")


def load_seeds(seed_dir: Path = SEED_DIR) -> list[Seed]:
    """All seeds, in file order (files sorted by name); checks each seed and that prompts are distinct."""
    seeds: list[Seed] = []
    for path in sorted(seed_dir.glob("*.txt")):
        block: list[str] = []
        start = 0
        for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines() + [""], 1):
            line = raw.rstrip()
            if line.startswith("#"):
                continue
            if line:
                if not block:
                    start = n
                block.append(line)
            elif block:
                seeds.append(parse_block(block, f"{path.name}:{start}"))
                block = []
    seen: dict[str, str] = {}
    for s in seeds:
        norm = " ".join(s.prompt.lower().split())
        if norm in seen:
            raise ValueError(f"{s.where}: prompt repeats the one at {seen[norm]}")
        seen[norm] = s.where
    return seeds


def labels_code(s: Seed) -> str:
    return "".join(
        (v or "-")[0] for v in (s.request_label, s.completion_label, s.response_label)
    )


def split_seeds(seeds: list[Seed]) -> tuple[list[Seed], list[Seed]]:
    """(train, dev): each (source, labels) group gives one seed in six to dev (rounded up), picking
    greedily the seed whose category and kind (its first tag, or plain) have so far the smallest share in
    dev (ties: prompt hash), so dev covers every source style, label combination, category, wrapper and
    look-alike in about the same proportions as train.
    Both splits are returned in prompt-hash order."""
    groups: dict[tuple[str, str], list[Seed]] = {}
    for s in seeds:
        groups.setdefault((s.source, labels_code(s)), []).append(s)
    def kind(s: Seed) -> str:
        return s.tags[0] if s.tags else "plain"

    total = Counter(s.category for s in seeds) + Counter(kind(s) for s in seeds)
    in_dev: Counter = Counter()

    def share(s: Seed) -> float:
        return in_dev[s.category] / total[s.category] + in_dev[kind(s)] / total[kind(s)]

    dev: list[Seed] = []
    for key in sorted(groups):
        left = sorted(groups[key], key=lambda s: s.key)
        for _ in range(-(-len(left) // DEV_EVERY)):
            best = min(left, key=lambda s: (share(s), s.key))
            left.remove(best)
            dev.append(best)
            in_dev[best.category] += 1
            in_dev[kind(best)] += 1
    chosen = {id(s) for s in dev}
    train = [s for s in seeds if id(s) not in chosen]
    return sorted(train, key=lambda s: s.key), sorted(dev, key=lambda s: s.key)


if __name__ == "__main__":
    import collections

    all_seeds = load_seeds()
    tr, dv = split_seeds(all_seeds)
    print(f"{len(all_seeds)} seeds: train {len(tr)}, dev {len(dv)}")
    print(collections.Counter((s.source, labels_code(s)) for s in all_seeds))
    print(collections.Counter(s.category for s in all_seeds))
