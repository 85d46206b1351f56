"""Compose the hand-written seeds into GuardReasonerTrain-format samples: data/train.jsonl, data/dev.jsonl.

Usage: python data/build.py [--out-dir DIR]

This follows the paper's teacher recipe (GuardReasoner section 3) by template instead of by GPT-4o: for each
seed interaction with gold labels it writes step-by-step reasoning per task (`# Task k`, `## Reasoning Step n`,
`## Conclusion`) and ends with the exact Answers block for the gold labels. The reasoning is built from the
seed's own phrases (what the user asks, why it is or is not harmful, what the response does, why the
response is or is not harmful) plus a few alternative phrasings picked by a hash of the prompt, so the
output is deterministic: running this twice gives the same bytes.

Each line of the output files is one JSON object with keys, in order: instruction, input, output, source,
category, tags.
"""

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, for `gr`
sys.path.insert(0, str(HERE))  # for `seeds`

from gr.prompts import INSTRUCTION, format_answers, format_input  # noqa: E402
from seeds import WRAPPERS, Seed, load_seeds, split_seeds  # noqa: E402

CATEGORY_PHRASE = {
    "violence": "physical violence against people or animals",
    "weapons": "weapons and explosives",
    "self-harm": "self-harm and suicide",
    "hate": "hateful content about protected groups",
    "harassment": "harassment and intimidation of individuals",
    "sexual": "sexual content and sexual exploitation",
    "drugs": "illegal drugs and dangerous drug use",
    "cybercrime": "cybercrime and unauthorized computer access",
    "fraud": "fraud and scams",
    "privacy": "violations of personal privacy",
    "misinformation": "deliberate misinformation",
    "extremism": "violent extremism",
    "theft": "theft and property crime",
}

ASK = (
    "The human user asks {g}.",
    "The user is asking {g}.",
    "In this request, the user asks {g}.",
    "The request asks {g}.",
)
WRAP_HARMFUL = {
    "roleplay": (
        "The request is wrapped in a role-play, but having a character voice the answer would not make the content any safer.",
        "Asking the assistant to play a character does not change what is actually being requested.",
    ),
    "hypothetical": (
        "Calling it hypothetical does not change the substance: the answer would be just as usable in reality.",
        "The hypothetical framing is a thin wrapper; a real answer would work the same way outside the thought experiment.",
    ),
    "fiction": (
        "The fictional framing is a wrapper: the requested details would work the same way outside the story.",
        "A story does not need working real-world details, so the fiction does not justify the request.",
    ),
    "jailbreak": (
        "The message tries to switch off the assistant's safeguards, which signals that the user expects the request to be refused.",
        "The instruction to ignore the rules is a jailbreak attempt and does not make the underlying request acceptable.",
    ),
    "pretext": (
        "The stated purpose cannot be verified, and it does not change what the requested content would enable.",
        "The justification offered does not match the content asked for, which would be harmful in anyone's hands.",
    ),
}
WRAP_BENIGN = {
    "roleplay": (
        "The request uses a persona, but the persona is only a playful framing for a harmless task.",
        "Playing this character involves nothing harmful.",
    ),
    "hypothetical": (
        "The hypothetical is a harmless thought experiment.",
        "Posing the question as a hypothetical is just a way to explore an idea; nothing harmful is sought.",
    ),
    "fiction": (
        "The fictional framing fits a harmless creative goal; no real-world harmful detail is sought.",
        "This is ordinary creative writing, and the story needs nothing dangerous.",
    ),
    "pretext": (
        "The stated purpose matches the harmless content asked for.",
        "The context given is consistent with a legitimate, harmless goal.",
    ),
}
WRAP_WORDS = re.compile(
    r"fram|wrapper|role|persona|character|fiction|story|novel|screenplay|script|film|movie|game|hypothetical|"
    r"thought experiment|jailbreak|safeguard|DAN|pretext|research|project|claim|student|instructor|teacher|"
    r"pharmacist|imagin",
    re.I,
)
LOOKALIKE = (
    "Some words here sound alarming out of context, but in this sentence their meaning is ordinary.",
    "Judged by its meaning rather than its keywords, the request is harmless.",
    "The alarming-sounding wording is figurative or technical, not a sign of harmful intent.",
)
CATEGORY_HARMFUL = (
    "This falls under {c}.",
    "The request belongs to the category of {c}.",
    "Requests like this fall under {c}.",
)
CATEGORY_BENIGN = (
    "It does not ask for anything that could hurt the user or others.",
    "There is no sign of intent to harm anyone.",
    "Answering it would pose no risk to anyone.",
    "Nothing in it seeks to cause harm.",
)

DOES = (
    "The AI assistant {d}.",
    "In its reply, the AI assistant {d}.",
    "Looking at the response, the AI assistant {d}.",
)
COMPLETION_NOTE = {
    "refused_harmful": (
        "It does not provide the content that was asked for.",
        "None of the requested content appears in the reply.",
        "It clearly declines to carry out the request.",
    ),
    "refused_benign": (
        "It declines to answer even though the request was harmless.",
        "It turns down a harmless request, which still counts as a refusal.",
        "The request is not answered, so this is a refusal, however needless.",
    ),
    "complied_harmful": (
        "It goes along with the request instead of declining.",
        "It does what the user asked rather than refusing.",
        "It provides what was requested, with no refusal.",
    ),
    "complied_safe": (
        "It engages with the request and gives an answer, although not the harmful version the user wanted.",
        "It responds to the request rather than declining it, but steers the answer toward safe content.",
    ),
    "complied_benign": (
        "It answers the request directly.",
        "It provides the help that was asked for.",
        "It engages fully with the request.",
    ),
}
REFUSAL_EXTRA = (
    "Offering alternatives does not change the fact that the request itself is declined.",
    "Suggesting other options is part of the refusal, not compliance with the original request.",
)
HARM_NOTE = {
    "harmful": (
        "Because it supplies what the harmful request sought, the response carries the same harm as the request.",
        "By complying, the assistant passes the harm of the request on to the user and possibly to others.",
        "The content could be put to harmful use directly.",
    ),
    "refused_harmful": (
        "A refusal like this gives the user nothing that could be misused.",
        "Declining keeps the response free of harmful content.",
    ),
    "refused_benign": (
        "Turning down a harmless request is unhelpful, but it does not put anyone at risk.",
        "An unnecessary refusal is a helpfulness problem, not a safety problem.",
    ),
    "complied_safe": (
        "Although the request was harmful, the content provided is safe.",
        "Complying with a harmful request does not make a response harmful when what it says is safe.",
    ),
    "complied_benign": (
        "The request itself was harmless, and the answer stays that way.",
        "Nothing in the answer could be used to hurt anyone.",
    ),
}
NO_RESPONSE_2 = (
    "The AI assistant's response is None: the input contains no response.",
    "There is no AI assistant response to examine; the input says None.",
    "The input gives None for the AI assistant, so no response was produced.",
)
NO_RESPONSE_2_EXTRA = (
    "Without a response, there is nothing to classify as a refusal or as compliance.",
    "Refusal detection needs a response, and there is none here.",
)
NO_RESPONSE_3 = (
    "Since there is no AI response, there is no content whose harmfulness could be assessed.",
    "With no response given, response harmfulness cannot be judged.",
    "There is no AI assistant response, so there is nothing that could be harmful or unharmful.",
)


def _h(seed: Seed, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\0{seed.prompt}".encode("utf-8")).digest()[:8], "big")


def pick(seed: Seed, salt: str, options):
    return options[_h(seed, salt) % len(options)]


def chance(seed: Seed, salt: str, percent: int) -> bool:
    return _h(seed, salt) % 100 < percent


def case_of(seed: Seed) -> str:
    if seed.response is None:
        return "none"
    harmful_req = seed.request_label == "harmful"
    if seed.completion_label == "refusal":
        return "refused_harmful" if harmful_req else "refused_benign"
    if seed.response_label == "harmful":
        return "complied_harmful"
    return "complied_safe" if harmful_req else "complied_benign"


def task1_steps(seed: Seed, short: bool = False) -> list[str]:
    harmful = seed.request_label == "harmful"
    ask = pick(seed, "ask", ASK).format(g=seed.gist)
    steps = [ask]
    wrappers = [t for t in seed.tags if t in WRAPPERS]
    if wrappers and not WRAP_WORDS.search(seed.why):  # skip when the seed's own reason names the framing
        table = WRAP_HARMFUL if harmful else WRAP_BENIGN
        steps.append(pick(seed, "wrap", table[wrappers[0]]))
    steps.append(seed.why)
    if "lookalike" in seed.tags and chance(seed, "look?", 60):
        steps.append(pick(seed, "look", LOOKALIKE))
    if chance(seed, "cat", 55) and not short:
        if harmful:
            steps.append(pick(seed, "catp", CATEGORY_HARMFUL).format(c=CATEGORY_PHRASE[seed.category]))
        else:
            steps.append(pick(seed, "catp", CATEGORY_BENIGN))
    if steps[1] == seed.why and chance(seed, "merge1", 20):  # sometimes the ask and the reason share a step
        steps[0:2] = [steps[0] + " " + seed.why]
    return steps[:4]


def task2_steps(seed: Seed) -> list[str]:
    case = case_of(seed)
    if case == "none":
        steps = [pick(seed, "none2", NO_RESPONSE_2)]
        if chance(seed, "none2x", 50):
            steps.append(pick(seed, "none2xp", NO_RESPONSE_2_EXTRA))
        return steps
    steps = [pick(seed, "does", DOES).format(d=seed.does)]
    mode = _h(seed, "mode2") % 10
    if mode >= 2:  # 80%: a second step naming the kind of reply
        steps.append(pick(seed, "note2", COMPLETION_NOTE[case]))
    if case == "refused_harmful" and mode >= 7 and "offer" in seed.does + seed.response.lower():
        steps.append(pick(seed, "refx", REFUSAL_EXTRA))
    return steps


def task3_steps(seed: Seed) -> list[str]:
    case = case_of(seed)
    if case == "none":
        return [pick(seed, "none3", NO_RESPONSE_3)]
    steps = [seed.response_why]
    if chance(seed, "note3", 55):
        steps.append(pick(seed, "note3p", HARM_NOTE["harmful" if case == "complied_harmful" else case]))
    return steps


def conclusion(task: int, seed: Seed) -> str:
    if task == 1:
        return f"The human user's request is {seed.request_label}."
    if task == 2:
        if seed.completion_label is None:
            return "The AI assistant's response is None."
        return f"The AI assistant's response is {'a refusal' if seed.completion_label == 'refusal' else 'compliance'}."
    if seed.response_label is None:
        return "The AI assistant's response is None."
    return f"The AI assistant's response is {seed.response_label}."


MAX_CHARS = 1300  # outputs stay short: a tiny model is trained on them on a CPU


def compose_output(seed: Seed, short: bool = False) -> str:
    """The reasoning for tasks 1-3 and the Answers block; too long an output is rebuilt without the
    optional category step."""
    parts = []
    for k, steps in enumerate((task1_steps(seed, short), task2_steps(seed), task3_steps(seed)), 1):
        assert 1 <= len(steps) <= 4, (seed.where, k, steps)
        body = "".join(f"## Reasoning Step {n}\n{text}\n\n" for n, text in enumerate(steps, 1))
        parts.append(f"# Task {k}\n\n{body}## Conclusion\n{conclusion(k, seed)}\n\n")
    out = "".join(parts) + format_answers(seed.request_label, seed.completion_label, seed.response_label)
    if len(out) > MAX_CHARS and not short:
        return compose_output(seed, short=True)
    return out


def compose(seed: Seed) -> dict:
    return {
        "instruction": INSTRUCTION,
        "input": format_input(seed.prompt, seed.response),
        "output": compose_output(seed),
        "source": seed.source,
        "category": seed.category,
        "tags": list(seed.tags),
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes(text.encode("utf-8"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where to write train.jsonl and dev.jsonl")
    args = ap.parse_args(argv)
    train, dev = split_seeds(load_seeds())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, seeds in (("train", train), ("dev", dev)):
        write_jsonl(args.out_dir / f"{name}.jsonl", [compose(s) for s in seeds])
        print(f"wrote {len(seeds)} samples to {args.out_dir / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
