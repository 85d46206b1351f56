"""A guard: a model and its tokenizer that read an interaction and give a verdict (paper sections 2 and 7).

The model reads the raw prompt of section 2 (instruction + "\\n" + input, BOS added by the tokenizer), as
the released models were run, and writes its reasoning and the Answers block; the verdict is read from
that output with `prompts.parse_answers`. When the interaction is too long for the model's context, only
the user's text is cut (the instruction and the framing stay), and the verdict says so.
infer.py, gr.evaluate, gr.mining and gr.serve all judge through this module.
"""

from dataclasses import dataclass, field

import torch

from gr import GRError
from gr.checkpoint import load_model, load_tokenizer, resolve
from gr.cli import DTYPES, check_device
from gr.generate import Completion, complete
from gr.prompts import INSTRUCTION, TASKS, parse_answers, raw_prompt

DEFAULT_MODEL = "yueliu1999/GuardReasoner-1B"


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

    labels: request, completion, response -> the label, or None where the model gave none or there is no
    response to judge (tasks 2 and 3 of a request alone are None whatever the output says).
    """

    labels: dict
    output: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    input_truncated: int = 0  # tokens of the user's text cut to fit the context
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"labels": self.labels, "output": self.output, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "seconds": round(self.seconds, 3),
                "input_truncated": self.input_truncated, **self.extra}


def verdict_labels(output: str, has_response: bool) -> dict:
    answers = parse_answers(output)
    return {task: answers.get(task) if has_response or task == "request" else None for task in TASKS}


class Guard:
    """A model and its tokenizer, with the room its outputs get (`max_new_tokens`)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 2048):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.budget = prompt_budget(model.config.max_position_embeddings, max_new_tokens)

    @classmethod
    def load(cls, path_or_id: str, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 2048) -> "Guard":
        """The guard of a checkpoint folder or hub id (errors name --model, as the command lines call it)."""
        check_device(device)
        try:
            folder = resolve(path_or_id)
        except GRError as e:
            raise GRError(f"{e} with --model DIR") from None
        return cls(load_model(folder, dtype=DTYPES[dtype], device=device), load_tokenizer(folder), max_new_tokens)

    def prompt(self, prompt: str, response: str | None, instruction: str = INSTRUCTION) -> tuple[str, int]:
        """The raw prompt for an interaction, fitted to the context, and the number of tokens cut."""
        return fit_prompt(self.tokenizer, prompt, response, self.budget, instruction)

    def generate(self, prompts: list[str], **kw) -> list[list[Completion]]:
        """Outputs for prompt texts (see gr.generate.complete; greedy unless a temperature is given)."""
        with torch.inference_mode():
            return complete(self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens, **kw)

    def judge(self, interactions: list[tuple[str, str | None]], *, batch_size: int = 8, progress: bool | str = False,
              instruction: str = INSTRUCTION, on_token=None) -> list[Verdict]:
        """Greedy verdicts for (prompt, response or None) pairs; `on_token(i, token_id)` sees each new
        token of interaction i as it is made (for streaming)."""
        fitted = [self.prompt(p, r, instruction) for p, r in interactions]
        outs = self.generate([text for text, _ in fitted], batch_size=batch_size, progress=progress, on_token=on_token)
        return [Verdict(verdict_labels(c.text, response is not None), c.text, c.prompt_tokens, len(c.tokens), c.seconds, cut)
                for (_, cut), [c], (_, response) in zip(fitted, outs, interactions)]
