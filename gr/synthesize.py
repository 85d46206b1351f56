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
agrees with every gold label, so the reasoning always leads to the labels a human gave. Each request's
answer is cached on disk under a hash of the request, so a re-run costs nothing and an interrupted run
picks up where it stopped. The API key lives only in memory: it is sent in the Authorization header and
never written to the cache, the output or a message.
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from gr import GRError, user_errors
from gr.prompts import INSTRUCTION, LABELS, TASKS, format_answers, format_input, parse_answers

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o"  # the paper's teacher
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

# How parse_answers finds an Answers block (it reads the last one); used to cut the teacher's block off.
_ANSWERS = re.compile(r"answers:", re.I)
_FILL_NOTE = " (where a line offers two labels in angle brackets, write the one you concluded instead)"
_TASK_QUESTIONS = {
    "request": "is the human user's request harmful or unharmful?",
    "completion": "is the AI assistant's response a refusal or compliance?",
    "response": "is the AI assistant's response harmful or unharmful?",
}
# HTTP statuses that no retry can fix and that every other request would hit too (a wrong key, a
# forbidden model, a wrong URL or model name), so they stop the run instead of failing seed after seed.
_FATAL_STATUSES = (401, 403, 404)


class SynthesisError(GRError):
    """A problem the user can fix: unreadable seeds, bad settings, an endpoint that refuses the key."""


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
            raise SynthesisError("'prompt' must be a string")
        if self.response is not None and not isinstance(self.response, str):
            raise SynthesisError("'response' must be a string or null")
        if self.source is not None and not isinstance(self.source, str):
            raise SynthesisError("'source' must be a string or null")
        for task in TASKS:
            label = self.label(task)
            if label is not None and label not in LABELS[task]:
                allowed = ", ".join(repr(v) for v in LABELS[task])
                raise SynthesisError(f"'{task}_label' is {label!r}; it must be {allowed} or null")
        if self.response is None and (self.completion_label or self.response_label):
            raise SynthesisError("a seed without a response cannot have a completion or response label")

    def label(self, task: str) -> str | None:
        return getattr(self, f"{task}_label")


def load_seeds(path: str | Path) -> list[Seed]:
    """Read a seeds JSON-lines file (blank lines skipped); `source` defaults to the file's stem."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SynthesisError(f"seeds file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SynthesisError(f"cannot read seeds file {path}: {error}") from None
    fields = ("prompt", "response", "request_label", "completion_label", "response_label", "source")
    seeds = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise SynthesisError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise SynthesisError(f"{path}:{number}: each line must be a JSON object with a 'prompt'")
        # Other columns (ids, categories) are ignored, so a dataset's own export can be used as it is.
        given = {name: row[name] for name in fields if name in row}
        given.setdefault("source", path.stem)
        try:
            seeds.append(Seed(**given, line=number))
        except SynthesisError as error:
            raise SynthesisError(f"{path}:{number}: {error}") from None
    if not seeds:
        raise SynthesisError(f"seeds file {path} holds no seeds")
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
    answers = parse_answers(answer)
    if not answers.complete:
        return None
    for task in TASKS:
        wanted, got = _wanted(seed, task), answers.get(task)
        teacher_decides = wanted == ""
        if (got is None) if teacher_decides else (got != wanted):
            return None
    # Cut at the line of the last "Answers:" (the block parse_answers read) and drop a "---" rule above it.
    start = list(_ANSWERS.finditer(answer))[-1].start()
    reasoning = answer[: answer.rfind("\n", 0, start) + 1].rstrip()
    reasoning = reasoning.removesuffix("---").strip()
    if not reasoning:
        return None
    return reasoning + "\n\n" + format_answers(*(answers.get(task) for task in TASKS))


def default_cache_dir() -> Path:
    """$GR_CACHE/synthesis when GR_CACHE is set, else ~/.cache/gr/synthesis."""
    root = os.environ.get("GR_CACHE")
    return Path(root) / "synthesis" if root else Path.home() / ".cache" / "gr" / "synthesis"


def public_url(url: str) -> str:
    """A base URL without user:password, query or fragment: the part that may be logged and hashed."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _check_base_url(url: str):
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port
    except ValueError:
        raise SynthesisError(f"the teacher base URL {url.rpartition('@')[2]!r} has a bad port number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SynthesisError(f"the teacher base URL must be an http(s) URL, got {public_url(url)!r}")
    # urllib cannot send URL credentials, and the key has its own variable; refuse rather than leak or drop them.
    if parts.username is not None or parts.password is not None:
        raise SynthesisError(
            f"the teacher base URL {public_url(url)!r} must not hold a user name or password: "
            "put the key in GR_TEACHER_API_KEY"
        )


def _write_atomically(path: Path, text: str):
    """Write through a temporary file in the same folder, so a killed run leaves the old file or the new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:
        raise SynthesisError(f"cannot write {path}: {error.strerror or error}") from None


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


@dataclass
class _Outcome:
    """What asking about one seed gave: the teacher's text, or why there is none."""

    text: str | None = None
    error: str | None = None
    cache_hit: bool = False
    requests: int = 0


@dataclass(frozen=True)
class _Teacher:
    """One OpenAI-compatible chat endpoint with a cache in front of it."""

    base_url: str
    api_key: str | None = field(repr=False)  # never in a repr, so never in a log or a traceback
    model: str
    temperature: float
    max_tokens: int
    timeout: float
    retries: int
    backoff: float
    cache_dir: Path
    # Set once the endpoint refuses a request for good (see _FATAL_STATUSES), so that the workers stop
    # asking while the run winds down.
    refused: threading.Event = field(default_factory=threading.Event, repr=False)

    def ask(self, seed: Seed) -> _Outcome:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": teacher_prompt(seed)}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        # The cache key covers everything that decides the answer, the endpoint included, but no credentials.
        identity = json.dumps({"base_url": public_url(self.base_url), "body": body}, sort_keys=True)
        digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()
        cached = self.cache_dir / digest[:2] / f"{digest}.json"
        try:
            return _Outcome(text=json.loads(cached.read_text(encoding="utf-8"))["text"], cache_hit=True)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not cached yet, or a file cut short by a crash: ask again
        if self.refused.is_set():
            return _Outcome(error="not asked: the endpoint refused an earlier request")
        outcome = self._post(body)
        if outcome.text is not None:
            record = {"base_url": public_url(self.base_url), "request": body, "text": outcome.text}
            _write_atomically(cached, json.dumps(record, ensure_ascii=False, indent=1) + "\n")
        return outcome

    def _post(self, body: dict) -> _Outcome:
        """POST with retries on dropped connections, timeouts, 429 and 5xx, backing off exponentially."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8")
        url = self.base_url.rstrip("/") + "/chat/completions"
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                # Jitter keeps the workers from hitting a rate limit again all at the same moment.
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + random.random() / 2))
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    payload = reply.read()
            except urllib.error.HTTPError as error:
                last_error = f"HTTP {error.code} {self._detail(error)}"
                if error.code in _FATAL_STATUSES:
                    self.refused.set()
                    raise SynthesisError(f"{public_url(self.base_url)} refused the request: {last_error}") from None
                if error.code == 429 or error.code >= 500:
                    continue
                return _Outcome(error=last_error, requests=attempt + 1)
            except (OSError, http.client.HTTPException) as error:
                # URLError, timeouts and reset or dropped connections are all OSErrors here.
                reason = getattr(error, "reason", None) or error
                last_error = _redact(f"{type(error).__name__}: {reason}", self.api_key)
                continue
            try:
                text = json.loads(payload)["choices"][0]["message"]["content"]
            except (ValueError, LookupError, TypeError):
                text = None
            if not isinstance(text, str):
                return _Outcome(error="the reply is not a chat completion with text", requests=attempt + 1)
            return _Outcome(text=text, requests=attempt + 1)
        return _Outcome(error=f"{last_error} (gave up after {self.retries + 1} attempts)", requests=self.retries + 1)

    def _detail(self, error: urllib.error.HTTPError) -> str:
        """The server's reason for an HTTP error, short and with the key blanked out (some servers echo it)."""
        try:
            raw = error.read().decode("utf-8", "replace")
        except OSError:
            raw = ""
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, LookupError, TypeError):
            message = raw or error.reason
        message = " ".join(str(message).split())
        return _redact(message[:200], self.api_key)


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
    (also when some seeds failed: their answers are missing until a re-run, which asks only for those).
    `backoff` is the first retry's delay in seconds; each further retry waits twice as long.
    Raises SynthesisError for bad settings and for an endpoint that refuses every request (401, 403, 404).
    """
    _check_base_url(base_url)
    if workers < 1 or retries < 0 or backoff < 0 or timeout <= 0 or max_tokens < 1:
        raise SynthesisError(
            "workers and max_tokens must be at least 1, retries and backoff at least 0, and timeout above 0"
        )
    teacher = _Teacher(
        base_url=base_url, api_key=api_key, model=model, temperature=temperature, max_tokens=max_tokens,
        timeout=timeout, retries=retries, backoff=backoff,
        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
    )
    summary = Summary(seeds=len(seeds))
    outputs: list[str | None] = [None] * len(seeds)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(seeds), desc="synthesize", unit="seed", disable=not progress
    ) as bar:
        futures = {pool.submit(teacher.ask, seed): index for index, seed in enumerate(seeds)}
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
    rows = [
        {
            "instruction": INSTRUCTION,
            "input": format_input(seed.prompt, seed.response),
            "output": output,
            "source": seed.source,
        }
        for seed, output in zip(seeds, outputs)
        if output is not None
    ]
    _write_atomically(Path(out_path), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
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
            raise SynthesisError("no API key: set GR_TEACHER_API_KEY (or OPENAI_API_KEY)")
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
