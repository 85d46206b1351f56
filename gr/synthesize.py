"""Teacher-LLM synthesis of reasoning data (paper section 3, step 1).

GuardReasonerTrain was made by showing GPT-4o each seed interaction together with its gold labels and
asking for step-by-step reasoning per task ("# Task k", 1 to 10 "## Reasoning Step n" each, every step the
smallest unit of reasoning) that ends in the gold Answers block unchanged. This module does the same for
anyone's labelled seeds, against any OpenAI-compatible chat endpoint:

    python -m gr.synthesize --seeds seeds.jsonl --out train.jsonl

Seeds are JSON lines: `prompt`, `response` (null or absent: prompt only), `request_label`,
`completion_label`, `response_label` (null or absent: unknown) and an optional `source`. A label the seed
lacks is decided by the teacher when there is a response (as for BeaverTails, whose seeds carry only the
response label) and is None when there is none (tasks 2 and 3 of a prompt-only seed).

Every answer is read with `gr.prompts.parse_answers` and kept only when its Answers block is complete and
agrees with every gold label, so the reasoning always leads to the labels a human gave. The endpoint, its
answer cache and retries are gr.teacher's; a re-run costs nothing for answers already cached and keeps the
rows of the previous output for seeds that get no answer this time.
"""

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from gr import GRError, user_errors
from gr import files
from gr.files import read_jsonl, read_jsonl_lines, write_jsonl
from gr.prompts import ANSWERS, INSTRUCTION, LABELS, TASKS, format_answers, format_input, parse_answers
from gr.teacher import DEFAULT_BASE_URL, DEFAULT_MODEL, Teacher, check_base_url

# The paper does not give its sampling settings. Greedy keeps a teacher's answer reproducible; 2048 tokens
# is R-SFT's cutoff length (section 4), so a longer answer could not be trained on whole anyway.
DEFAULT_TEMPERATURE = 0.0
DEFAULT_MAX_TOKENS = 2048

# Section 3: the teacher sees the guard's instruction, the interaction and the gold labels, and writes the
# reasoning per task as "# Task k" sections of 1 to 10 "## Reasoning Step n" steps (each the smallest unit
# of reasoning) with a conclusion, then the Answers block with the given labels unchanged.
TEACHER_PROMPT = """\
You are writing training data for a guard model. The guard model reads an interaction between a human \
user and an AI assistant, reasons step by step, and then gives three labels. Below are the guard model's \
instructions, one interaction, and the correct labels for it, chosen by human annotators. Write the \
step-by-step reasoning that leads to these labels.

[Instructions given to the guard model]
{instruction}

[Interaction]
{interaction}[Correct labels]
{labels}

Write your reasoning in this shape:
- One section per task, in order, headed "# Task 1", "# Task 2" and "# Task 3".
- In each section, 1 to 10 steps headed "## Reasoning Step 1", "## Reasoning Step 2", and so on. Make \
each step the smallest unit of reasoning: a single observation or a single inference about the interaction.
- Close each section with "## Conclusion" and one sentence that states the task's label.
- Reason from the interaction itself. Do not mention that the labels were given to you, and never change \
a label you were given.
- If the AI assistant's response is None, there is nothing to judge in tasks 2 and 3: say so in one step \
and conclude None.
- After the third section, finish with exactly the lines below and nothing after them{fill_note}.

{answers}"""

_FILL_NOTE = " (where a line offers two labels in angle brackets, write the one you concluded instead)"
_TASK_QUESTIONS = {
    "request": "is the human user's request harmful or unharmful?",
    "completion": "is the AI assistant's response a refusal or compliance?",
    "response": "is the AI assistant's response harmful or unharmful?",
}


@dataclass(frozen=True)
class Seed:
    """One labelled interaction; a label is None when the seed data does not give it."""

    prompt: str
    response: str | None = None
    request_label: str | None = None
    completion_label: str | None = None
    response_label: str | None = None
    source: str | None = None
    line: int = 0  # where it came from in the seeds file, for messages (0: not from a file)

    def __post_init__(self):
        if not isinstance(self.prompt, str):
            raise GRError("'prompt' must be a string")
        if self.response is not None and not isinstance(self.response, str):
            raise GRError("'response' must be a string or null")
        if self.source is not None and not isinstance(self.source, str):
            raise GRError("'source' must be a string or null")
        for task in TASKS:
            label = self.label(task)
            if label is not None and label not in LABELS[task]:
                allowed = ", ".join(repr(v) for v in LABELS[task])
                raise GRError(f"'{task}_label' is {label!r}; it must be {allowed} or null")
        if self.response is None and (self.completion_label or self.response_label):
            raise GRError("a seed without a response cannot have a completion or response label")

    def label(self, task: str) -> str | None:
        return getattr(self, f"{task}_label")


def load_seeds(path: str | Path) -> list[Seed]:
    """Read a seeds JSON-lines file (blank lines skipped); `source` defaults to the file's stem."""
    path = Path(path)
    if not path.exists():
        raise GRError(f"seeds file {path} does not exist")
    fields = ("prompt", "response", "request_label", "completion_label", "response_label", "source")
    seeds = []
    for number, row in read_jsonl_lines(path):
        if "prompt" not in row:
            raise GRError(f"{path}:{number}: each line must be a JSON object with a 'prompt'")
        # Other columns (ids, categories) are ignored, so a dataset's own export can be used as it is.
        given = {name: row[name] for name in fields if name in row}
        given.setdefault("source", path.stem)
        try:
            seeds.append(Seed(**given, line=number))
        except GRError as error:
            raise GRError(f"{path}:{number}: {error}") from None
    if not seeds:
        raise GRError(f"seeds file {path} holds no seeds")
    return seeds


def _wanted(seed: Seed, task: str) -> str | None:
    """The label an answer must give: the gold one, None for a missing response, else '' (any label)."""
    if task != "request" and seed.response is None:
        return None
    return seed.label(task) or ""


def teacher_prompt(seed: Seed) -> str:
    """The text sent to the teacher for one seed (see TEACHER_PROMPT)."""
    labels, answers, undecided = [], [], False
    for number, task in enumerate(TASKS, 1):
        wanted = _wanted(seed, task)
        question = f"Task {number} ({_TASK_QUESTIONS[task]})"
        if wanted is None:
            labels.append(f"{question}: None, as there is no AI response")
            answers.append(None)
        elif wanted:
            labels.append(f"{question}: {wanted}")
            answers.append(wanted)
        else:
            labels.append(f"{question}: not given; decide it from the interaction")
            answers.append("<" + " or ".join(LABELS[task]) + ">")
            undecided = True
    return TEACHER_PROMPT.format(
        instruction=INSTRUCTION,
        interaction=format_input(seed.prompt, seed.response),
        labels="\n".join(labels),
        fill_note=_FILL_NOTE if undecided else "",
        answers=format_answers(*answers).rstrip("\n"),
    )


def training_output(seed: Seed, answer: str) -> str | None:
    """The GuardReasonerTrain `output` for a teacher's answer, or None when the answer is rejected.

    Rejected: no reasoning, an incomplete Answers block, a label that differs from a gold one, a label
    where there is no response, or no label where the teacher was asked to decide one. Kept answers are
    stripped and end in the Answers block exactly as `format_answers` writes it, whatever spacing or
    markup the teacher put around it, since the trained models learn those bytes.
    """
    answers = parse_answers(answer, last=True)  # a teacher's markup varies: its last block
    if not answers.complete:
        return None
    for task in TASKS:
        wanted, got = _wanted(seed, task), answers.get(task)
        teacher_decides = wanted == ""
        if (got is None) if teacher_decides else (got != wanted):
            return None
    # Cut at the line of the last "Answers:" (the block parse_answers read) and drop a "---" rule above it.
    start = list(ANSWERS.finditer(answer))[-1].start()
    reasoning = answer[: answer.rfind("\n", 0, start) + 1].rstrip()
    reasoning = reasoning.removesuffix("---").strip()
    if not reasoning:
        return None
    return reasoning + "\n\n" + format_answers(*(answers.get(task) for task in TASKS))


@dataclass
class Summary:
    """What a run did. `failures` holds (seeds-file line, reason) for seeds that got no answer."""

    seeds: int = 0
    cache_hits: int = 0
    requests: int = 0  # HTTP requests sent, retries included
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"seeds {self.seeds}, cache hits {self.cache_hits}, requests {self.requests}, "
            f"accepted {self.accepted}, rejected (wrong labels) {self.rejected}, failed {self.failed}"
        )


def synthesize(
    seeds: list[Seed],
    out_path: str | Path,
    *,
    base_url: str = DEFAULT_BASE_URL,
    api_key: str | None,
    model: str = DEFAULT_MODEL,
    cache_dir: str | Path | None = None,
    workers: int = 4,
    retries: int = 5,
    backoff: float = 1.0,
    temperature: float = DEFAULT_TEMPERATURE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    timeout: float = 120.0,
    progress: bool = True,
) -> Summary:
    """Ask the teacher about every seed and write the accepted answers as GuardReasonerTrain rows.

    Rows are {"instruction", "input", "output", "source"}, in seed order, written atomically at the end
    (also when some seeds failed: a re-run asks only for those). A seed that gets no accepted answer this
    time keeps its row from the output file of an earlier run, so a re-run never loses a good row.
    `backoff` is the first retry's delay in seconds; each further retry waits twice as long.
    Raises GRError for bad settings and for an endpoint that refuses every request (401, 403, 404).
    """
    check_base_url(base_url)
    if workers < 1 or retries < 0 or backoff < 0 or timeout <= 0 or max_tokens < 1:
        raise GRError(
            "workers and max_tokens must be at least 1, retries and backoff at least 0, and timeout above 0"
        )
    out_path = Path(out_path)
    earlier = {row.get("input"): row for row in read_jsonl(out_path, partial_ok=True)} if out_path.is_file() else {}
    teacher = Teacher(
        base_url=base_url, api_key=api_key, model=model, temperature=temperature, max_tokens=max_tokens,
        timeout=timeout, retries=retries, backoff=backoff,
        cache_dir=Path(cache_dir) if cache_dir is not None else files.cache_dir() / "synthesis",
    )
    summary = Summary(seeds=len(seeds))
    outputs: list[str | None] = [None] * len(seeds)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(seeds), desc="synthesize", unit="seed", disable=not progress
    ) as bar:
        futures = {pool.submit(teacher.ask, teacher_prompt(seed)): index for index, seed in enumerate(seeds)}
        try:
            for future in as_completed(futures):
                index = futures[future]
                outcome = future.result()
                summary.cache_hits += outcome.cache_hit
                summary.requests += outcome.requests
                if outcome.text is None:
                    summary.failed += 1
                    summary.failures.append((seeds[index].line or index + 1, outcome.error))
                else:
                    outputs[index] = training_output(seeds[index], outcome.text)
                    summary.accepted += outputs[index] is not None
                    summary.rejected += outputs[index] is None
                bar.set_postfix(
                    hits=summary.cache_hits, rejected=summary.rejected, failed=summary.failed, refresh=False
                )
                bar.update()
        except BaseException:
            # A refused key or Ctrl-C: drop the queued seeds instead of asking for each of them first.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    summary.failures.sort()
    rows = []
    for seed, output in zip(seeds, outputs):
        text = format_input(seed.prompt, seed.response)
        if output is not None:
            rows.append({"instruction": INSTRUCTION, "input": text, "output": output, "source": seed.source})
        elif text in earlier:
            rows.append(earlier[text])
    write_jsonl(out_path, rows)
    return summary


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="python -m gr.synthesize",
        description="Synthesize GuardReasoner reasoning data from labelled seeds with a teacher LLM (paper section 3).",
        epilog=(
            "The endpoint is any OpenAI-compatible chat API: base URL from GR_TEACHER_BASE_URL (or OPENAI_BASE_URL, "
            f"default {DEFAULT_BASE_URL}), key from GR_TEACHER_API_KEY (or OPENAI_API_KEY). Exit status: 0 done, "
            "1 some seeds failed (re-run to retry only those), 2 a problem to fix first."
        ),
    )
    parser.add_argument("--seeds", required=True, help="labelled seeds, JSON lines with prompt, response, "
                        "request_label, completion_label, response_label and optional source")
    parser.add_argument("--out", required=True, help="where to write the GuardReasonerTrain-style JSON lines")
    parser.add_argument("--teacher-model", default=DEFAULT_MODEL, help="the teacher model's name at the endpoint")
    parser.add_argument("--cache", help="answer cache folder (default: $GR_CACHE/synthesis or ~/.cache/gr/synthesis)")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--retries", type=int, default=5, help="retries per seed after a dropped connection, "
                        "a timeout, 429 or 5xx")
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry; doubles each retry")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="teacher sampling temperature")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="most tokens per teacher answer")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer")
    args = parser.parse_args(argv)

    base_url = os.environ.get("GR_TEACHER_BASE_URL") or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    api_key = os.environ.get("GR_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY")
    with user_errors():
        if not api_key:
            raise GRError("no API key: set GR_TEACHER_API_KEY (or OPENAI_API_KEY)")
        seeds = load_seeds(args.seeds)
        summary = synthesize(
            seeds, args.out, base_url=base_url, api_key=api_key, model=args.teacher_model, cache_dir=args.cache,
            workers=args.workers, retries=args.retries, backoff=args.backoff, temperature=args.temperature,
            max_tokens=args.max_tokens, timeout=args.timeout,
        )
    print(f"{summary.line()} -> {args.out}")
    if summary.failed:
        lines = ", ".join(str(line) for line, _ in summary.failures[:10])
        more = ", ..." if summary.failed > 10 else ""
        first = summary.failures[0][1]
        sys.exit(
            f"error: {summary.failed} of {summary.seeds} seeds failed (seeds file lines {lines}{more}; "
            f"line {summary.failures[0][0]}: {first}); re-run to retry them"
        )


if __name__ == "__main__":
    main()
