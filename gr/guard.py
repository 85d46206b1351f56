"""A guard: a model and its tokenizer that read an interaction and give a verdict (paper sections 2 and 7).

With reasoning (the paper's way): the model reads the raw prompt of section 2 (instruction + "\\n" + input,
BOS added by the tokenizer), writes its reasoning and its Answers block greedily, and generation stops at
the end of that block; the labels are read from the model's own block (`prompts.parse_answers`).
Fast: no reasoning; the Answers block is put right after the prompt and each label is chosen by the model
from one prefill plus a few tokens per field. The instruction's keys and values are computed once per
model and reused by every fast verdict.

Every verdict carries, per task, the probability of the positive label (harmful, refusal): the Answers
block is teacher-forced after the model's own text and the summed log-probabilities of the two label
continuations are compared, each field conditioned on the fields before it (as the model wrote them;
in fast mode, as it chose them). It also carries flags: `parse_error` (no complete Answers block of the
model's own: its labels are "unknown"), `input_truncated` (tokens of the user's text cut to fit the
context, 0 when none) and `hit_max_new_tokens`. infer.py, gr.evaluate, gr.mining and gr.serve all judge
through this module.
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gr import GRError
from gr.checkpoint import GUARD_FILE, load_model, load_tokenizer, resolve
from gr.cli import DTYPES, check_device
from gr.generate import Completion, complete
from gr.model import KVCache
from gr.prompts import ANSWERS_HEAD, FIELDS, INSTRUCTION, LABELS, TASKS, own_block_start, parse_answers, raw_prompt

DEFAULT_MODEL = "yueliu1999/GuardReasoner-1B"
UNKNOWN = "unknown"  # the label of a task when the model gave no readable verdict


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Tokens a prompt may take: the model's context less the room kept for the output, which is
    max_new_tokens but at most half the context (a guard's reasoning is rarely longer than its input)."""
    return context - min(max_new_tokens, context // 2)


def fit_prompt(tokenizer, prompt: str, response: str | None, budget: int,
               instruction: str = INSTRUCTION) -> tuple[str, int]:
    """The raw prompt in at most `budget` tokens (BOS included), and how many tokens were cut to fit.

    Only the user's text is cut, the end of the request and of the response (the shorter keeps up to
    half the room), so the instruction and the "Human user:" / "AI assistant:" framing stay intact.
    """
    text = raw_prompt(prompt, response, instruction)
    total = len(tokenizer.encode(text))
    if total <= budget:
        return text, 0
    parts = [tokenizer.encode(prompt, bos=False), tokenizer.encode(response or "", bos=False)]
    frame = len(tokenizer.encode(raw_prompt("", None if response is None else "", instruction)))
    room = budget - frame
    while room > 0:
        short = 0 if len(parts[0]) <= len(parts[1]) else 1
        keep = [0, 0]
        keep[short] = min(len(parts[short]), room // 2)
        keep[1 - short] = min(len(parts[1 - short]), room - keep[short])
        # A cut inside a multi-byte character decodes to U+FFFD; drop that half character.
        texts = [tokenizer.decode(p[:k], skip_special_tokens=False).rstrip("\ufffd") for p, k in zip(parts, keep)]
        text = raw_prompt(texts[0], None if response is None else texts[1], instruction)
        n = len(tokenizer.encode(text))
        if n <= budget:
            return text, total - n
        room -= n - budget  # re-encoding merged differently at the cut: take the difference off too
    raise GRError(f"the model's context leaves {budget} tokens for the prompt, fewer than the instruction "
                  f"and its framing need ({frame}): lower --max-new-tokens")


@dataclass
class Verdict:
    """What a guard said about one interaction.

    labels: request, completion, response -> the label; "unknown" when the model gave no complete Answers
    block of its own (parse_error); None for tasks 2 and 3 when there is no response to judge.
    probabilities: the same tasks -> P(harmful) for request and response, P(refusal) for completion; None
    where the label is None or the verdict could not be read.
    """

    labels: dict
    probabilities: dict
    parse_error: bool
    input_truncated: int  # tokens of the user's text cut to fit the context (0: none)
    hit_max_new_tokens: bool
    output: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    mode: str  # "reasoning" or "fast"

    def as_dict(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 3),
                "probabilities": {t: None if p is None else round(p, 6) for t, p in self.probabilities.items()}}


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class _Scorer:
    """Teacher-forcing on one sequence whose keys and values stay in a cache: `move_to(ids)` makes the
    cache hold exactly `ids` (keeping the common prefix), `logprob(ids, start)` is log p(ids[start:] |
    ids[:start]) by the model."""

    def __init__(self, model, cache: KVCache, ids: list[int]):
        self.model, self.cache, self.ids = model, cache, list(ids)

    def _feed(self, ids: list[int], keep: int) -> torch.Tensor:
        """Cut the cache to `keep` positions, feed ids[keep:], return the logits at those positions."""
        self.cache.truncate(keep)
        device = self.cache.k[0].device
        logits = self.model(torch.tensor([ids[keep:]], device=device), cache=self.cache)[0]
        self.ids = list(ids)
        return logits.float()

    def move_to(self, ids: list[int]) -> None:
        keep = min(_common(self.ids, ids), len(ids) - 1, self.cache.length)
        if keep < len(ids):
            self._feed(ids, keep)

    def logprob(self, ids: list[int], start: int) -> float:
        # The logits that predict ids[start] sit at position start - 1, so feeding starts there at the latest.
        keep = min(_common(self.ids, ids), start - 1, self.cache.length)
        logits = self._feed(ids, keep)
        targets = torch.tensor(ids[start:], device=logits.device)
        rows = torch.arange(start - 1 - keep, len(ids) - 1 - keep, device=logits.device)
        return torch.log_softmax(logits[rows], -1).gather(1, targets[:, None]).sum().item()


class Guard:
    """A model and its tokenizer, with the room its outputs get (`max_new_tokens`)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 2048, fast_instruction: str = INSTRUCTION):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.budget = prompt_budget(model.config.max_position_embeddings, max_new_tokens)
        self.fast_instruction = fast_instruction
        self._prefixes = {}  # instruction -> (its tokens shared by every prompt, their keys and values)

    @classmethod
    def load(cls, path_or_id: str, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 2048) -> "Guard":
        """The guard of a checkpoint folder or hub id (errors name --model, as the command lines call it)."""
        check_device(device)
        try:
            folder = resolve(path_or_id)
        except GRError as e:
            raise GRError(f"{e} with --model DIR") from None
        settings = json.loads((folder / GUARD_FILE).read_text()) if (folder / GUARD_FILE).is_file() else {}
        return cls(load_model(folder, dtype=DTYPES[dtype], device=device), load_tokenizer(folder), max_new_tokens,
                   settings.get("fast_instruction", INSTRUCTION))

    @property
    def device(self):
        return next(self.model.parameters()).device

    def prompt(self, prompt: str, response: str | None, instruction: str = INSTRUCTION) -> tuple[str, int]:
        """The raw prompt for an interaction, fitted to the context, and the number of tokens cut."""
        return fit_prompt(self.tokenizer, prompt, response, self.budget, instruction)

    def generate(self, prompts: list[str], **kw) -> list[list[Completion]]:
        """Outputs for prompt texts (see gr.generate.complete; greedy unless a temperature is given)."""
        with torch.inference_mode():
            return complete(self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens, **kw)

    def judge(self, interactions: list[tuple[str, str | None]], *, batch_size: int = 8, progress: bool | str = False,
              fast: bool = False, probabilities: bool = True, on_token=None) -> list[Verdict]:
        """Verdicts for (prompt, response or None) pairs; `on_token(i, token_id)` sees each new token of
        interaction i as it is made (for streaming)."""
        if fast:
            return [self._fast(p, r) for p, r in interactions]
        fitted = [self.prompt(p, r) for p, r in interactions]

        def own_block_done(tokens):  # stop at the end of the model's own Answers block
            return parse_answers(self.tokenizer.decode(tokens)).complete

        outs = self.generate([text for text, _ in fitted], batch_size=batch_size, progress=progress,
                             on_token=on_token, done=own_block_done)
        verdicts = []
        for (text, cut), [c], (_, response) in zip(fitted, outs, interactions):
            began = time.perf_counter()
            answers = parse_answers(c.text)
            labels, probs = self._labels(text, c.text, answers, response is not None, probabilities)
            verdicts.append(Verdict(labels, probs, not answers.complete, cut,
                                    len(c.tokens) >= self.max_new_tokens and not answers.complete, c.text,
                                    c.prompt_tokens, len(c.tokens), c.seconds + time.perf_counter() - began, "reasoning"))
        return verdicts

    def _labels(self, prompt_text: str, output: str, answers, has_response: bool, probabilities: bool):
        """Labels of the model's own block, and their probabilities when asked for."""
        tasks = TASKS if has_response else TASKS[:1]
        if not answers.complete:
            return ({t: UNKNOWN if t in tasks else None for t in TASKS}, dict.fromkeys(TASKS))
        labels = {t: answers.get(t) if t in tasks else None for t in TASKS}
        if not probabilities:
            return labels, dict.fromkeys(TASKS)
        start = own_block_start(output)
        head = output[:start + output[start:].lower().index(FIELDS["request"].lower())]
        _, probs = self._score_fields(prompt_text + head, tasks, labels, INSTRUCTION)
        return labels, probs

    def _fast(self, prompt: str, response: str | None) -> Verdict:
        began = time.perf_counter()
        text, cut = self.prompt(prompt, response, self.fast_instruction)
        tasks = TASKS if response is not None else TASKS[:1]
        labels, probs = self._score_fields(text + ANSWERS_HEAD, tasks, None, self.fast_instruction)
        output = ANSWERS_HEAD + "".join(f"{FIELDS[t]}: {labels[t]}\n" for t in TASKS)
        return Verdict(labels, probs, False, cut, False, output, len(self.tokenizer.encode(text)), 0,
                       time.perf_counter() - began, "fast")

    @torch.inference_mode()
    def _score_fields(self, text: str, tasks, own: dict | None, instruction: str) -> tuple[dict, dict]:
        """Teacher-force the Answers block after `text` (a prompt with `instruction`, and the output up to
        where the block's first field starts).

        Per task in order: the log-probabilities of the lines "Request: harmful\\n" and "Request:
        unharmful\\n" (and likewise) after the text so far; P(positive) is their two-way softmax. The
        line kept for the next field is the model's own label (`own`) or, without one, the likelier label.
        Whole lines are scored from a line start, where tokenization is stable; the shared tokens add the
        same to both and cancel.
        """
        scorer = self._scorer(self.tokenizer.encode(text), instruction)
        labels, probs = dict.fromkeys(TASKS), dict.fromkeys(TASKS)
        for task in tasks:
            lines = [f"{FIELDS[task]}: {label}\n" for label in LABELS[task]]
            candidates = [self.tokenizer.encode(text + line) for line in lines]
            start = _common(*candidates)
            logps = [scorer.logprob(ids, start) for ids in candidates]
            probs[task] = 1.0 / (1.0 + math.exp(logps[1] - logps[0]))
            labels[task] = own[task] if own else LABELS[task][0 if logps[0] >= logps[1] else 1]
            text += f"{FIELDS[task]}: {labels[task]}\n"
        for task in TASKS:
            if task not in tasks:
                text += f"{FIELDS[task]}: None\n"
        return labels, probs

    def _scorer(self, ids: list[int], instruction: str) -> _Scorer:
        """A scorer whose cache holds `ids`, starting from the instruction's cached keys and values."""
        prefix_ids, prefix_cache = self._prefix(instruction)
        room = len(ids) + 64
        if ids[:len(prefix_ids)] == prefix_ids:
            scorer = _Scorer(self.model, prefix_cache.copy(room), prefix_ids)
        else:  # the token boundary after the instruction moved: compute everything
            scorer = _Scorer(self.model, KVCache(self.model.config, 1, room, prefix_cache.k[0].dtype, self.device), [])
        scorer.move_to(ids)
        return scorer

    def _prefix(self, instruction: str) -> tuple[list[int], KVCache]:
        """The tokens every prompt with this instruction starts with, and their keys and values (computed once).

        The common tokens of two different prompts are the shared prefix: a tokenizer may merge the
        instruction's last newline with what follows, so the boundary is taken where tokens agree."""
        if instruction not in self._prefixes:
            a = self.tokenizer.encode(raw_prompt("a", None, instruction))
            b = self.tokenizer.encode(raw_prompt("b", "c", instruction))
            ids = a[:_common(a, b)]
            cache = KVCache(self.model.config, 1, len(ids), next(self.model.parameters()).dtype, self.device)
            with torch.inference_mode():
                self.model(torch.tensor([ids], device=self.device), cache=cache)
            self._prefixes[instruction] = (ids, cache)
        return self._prefixes[instruction]

