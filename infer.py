"""Guard an interaction with a GuardReasoner model: stream its step-by-step reasoning, then the verdict.

    python infer.py "PROMPT" [--response "TEXT"] [--model PATH_OR_HUB_ID] [--json]
    python infer.py --file IN.jsonl [--out OUT.jsonl] [--batch-size 8]

The model reads the raw prompt of paper section 2 (instruction + "\\n" + input, BOS added by the
tokenizer) and decodes greedily, up to 2048 new tokens, as the released models were evaluated. The
verdict is read with `prompts.parse_answers` from the last Answers block of the output.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from gr import GRError, user_errors
from gr.evaluate import DTYPES, fit_prompt, load_guard, prompt_budget
from gr.generate import complete, generate
from gr.prompts import TASKS, parse_answers

DEFAULT_MODEL = "yueliu1999/GuardReasoner-1B"


def check_text(prompt, response, where: str = "") -> None:
    """An interaction needs a request; a response, when given, must say something."""
    if not prompt.strip():
        raise GRError(f"{where}the prompt is empty: give the user's request to judge")
    if response is not None and not response.strip():
        raise GRError(f"{where}the response is empty: leave it out when there is no AI response")


def read_requests(path: str) -> list[tuple[int, str, str | None]]:
    """(line number, prompt, response or None) of each line of a JSON-lines file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GRError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    items = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GRError(f"{path}: line {n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise GRError(f'{path}: line {n} has no string "prompt" (lines are {{"prompt": ..., "response": ...}})')
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise GRError(f'{path}: line {n}: "response" must be a string or null')
        check_text(row["prompt"], response, f"{path}: line {n}: ")
        items.append((n, row["prompt"], response))
    if not items:
        raise GRError(f"{path} holds no lines to judge")
    return items


def fit(tokenizer, model, prompt, response, max_new_tokens, where: str = "") -> str:
    """The raw prompt, its user text cut (with a warning) when it would not fit the model's context."""
    context = model.config.max_position_embeddings
    budget = prompt_budget(context, max_new_tokens)
    text, cut = fit_prompt(tokenizer, prompt, response, budget)
    if cut:
        print(f"warning: {where}the input is longer than the {budget} tokens the model's context of {context} "
              f"leaves for it; cut {cut} tokens off the end of the user's text", file=sys.stderr)
    return text


def record(prompt, response, output: str, prompt_tokens: int, new_tokens: int, seconds: float) -> dict:
    """One result; without a response, the completion and response labels are None whatever the model says."""
    answers = parse_answers(output)
    labels = {task: answers.get(task) if response is not None or task == "request" else None for task in TASKS}
    return {"prompt": prompt, "response": response, "labels": labels, "output": output,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "seconds": round(seconds, 3)}


def verdict(result: dict) -> str:
    """The short verdict printed after the streamed reasoning."""
    labels = result["labels"]
    read = {task: labels[task] or "could not read" for task in TASKS}
    response = (f"{read['completion']}, {read['response']}" if result["response"] is not None
                else "no response given")
    return f"Request:  {read['request']}\nResponse: {response}"


def guard_one(model, tokenizer, prompt, response, max_new_tokens: int, stream: bool) -> dict:
    """Judge one interaction; with `stream`, print the output to stdout as it is generated."""
    ids = tokenizer.encode(fit(tokenizer, model, prompt, response, max_new_tokens), bos=True)
    made, shown = [], ""

    def show(_row, token):
        # Decode everything so far and print only what is new, so a character split over tokens prints
        # whole; a text ending in U+FFFD is waiting for the rest of its character.
        nonlocal shown
        made.append(token)
        text = tokenizer.decode(made)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    start = time.perf_counter()
    tokens = generate(model, [ids], max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids,
                      pad_id=tokenizer.pad_id, on_token=show if stream else None)[0]
    seconds = time.perf_counter() - start
    output = tokenizer.decode(tokens)
    if stream:
        sys.stdout.write(output[len(shown):] + "\n")
    return record(prompt, response, output, len(ids), len(tokens), seconds)


def guard_file(model, tokenizer, items, path: str, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Judge the lines of a file in batches; `seconds` is the run's time shared equally among its lines."""
    prompts = [fit(tokenizer, model, p, r, max_new_tokens, f"{path}: line {n}: ") for n, p, r in items]
    start = time.perf_counter()
    outputs = complete(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       progress="guarding")
    share = (time.perf_counter() - start) / len(items)
    return [record(p, r, c.text, c.prompt_tokens, len(c.tokens), share)
            for (_, p, r), [c] in zip(items, outputs)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Judge whether a user's request (and an AI's response) is harmful, "
                                                 "with GuardReasoner's step-by-step reasoning.")
    parser.add_argument("prompt", nargs="?", help="the user's request to judge")
    parser.add_argument("--response", default=None, help="the AI assistant's response, if there is one")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"checkpoint folder or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights dtype (default: float32)")
    parser.add_argument("--max-new-tokens", type=int, default=2048, help="longest output in tokens (default: 2048)")
    parser.add_argument("--json", action="store_true",
                        help="no streaming: print one JSON object with labels and output")
    parser.add_argument("--file", default=None,
                        help='JSON lines of {"prompt": ..., "response": ...} to judge in batches')
    parser.add_argument("--out", default=None, help="with --file: write the JSON lines here (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=8, help="with --file: interactions generated together")
    args = parser.parse_args(argv)
    with user_errors():
        if (args.prompt is None) == (args.file is None):
            raise GRError("give either a PROMPT to judge or --file IN.jsonl (not both)")
        if args.out is not None and args.file is None:
            raise GRError("--out writes the results of --file; without --file the result goes to stdout")
        if args.max_new_tokens < 1 or args.batch_size < 1:
            raise GRError("--max-new-tokens and --batch-size must be at least 1")
        # Bad input is reported before the model loads.
        if args.file is None:
            check_text(args.prompt, args.response)
        else:
            items = read_requests(args.file)
        model, tokenizer = load_guard(args.model, args.device, args.dtype)
        if args.file is not None:
            results = guard_file(model, tokenizer, items, args.file, args.max_new_tokens, args.batch_size)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
            if args.out is None:
                sys.stdout.write(lines)
            else:
                try:
                    Path(args.out).write_text(lines, encoding="utf-8")
                except OSError as e:
                    raise GRError(f"cannot write {args.out}: {e.strerror}") from None
        elif args.json:
            print(json.dumps(guard_one(model, tokenizer, args.prompt, args.response, args.max_new_tokens, False),
                             ensure_ascii=False))
        else:
            result = guard_one(model, tokenizer, args.prompt, args.response, args.max_new_tokens, True)
            print(f"\n=== verdict ===\n{verdict(result)}")


if __name__ == "__main__":
    main()
