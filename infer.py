"""Guard an interaction with a GuardReasoner model: stream its step-by-step reasoning, then the verdict.

    python infer.py "PROMPT" [--response "TEXT"] [--model PATH_OR_HUB_ID] [--json] [--fast]
    python infer.py --file IN.jsonl [--out OUT.jsonl] [--batch-size 8] [--fast]

The model reads the raw prompt of paper section 2 (instruction + "\\n" + input, BOS added by the
tokenizer) and decodes greedily, up to 2048 new tokens, as the released models were evaluated (gr.guard);
--fast skips the reasoning and reads the Answers block from one prefill. Every result carries the labels,
the probability of each positive label, and the flags parse_error, input_truncated and hit_max_new_tokens.
With --file, each result is written as soon as its batch is done, and a summary counts the flags; with
--out, a rerun skips the lines the file already holds, so an interrupted run continues where it stopped.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from gr import GRError, user_errors
from gr.cli import DTYPES, at_least, check_device
from gr.files import JsonlAppender, check_writable, dumps, read_jsonl, read_jsonl_lines
from gr.guard import DEFAULT_MODEL, Guard, Verdict
from gr.prompts import LABELS


def check_text(prompt, response, where: str = "") -> None:
    """An interaction needs a request; a response, when given, must say something."""
    if not prompt.strip():
        raise GRError(f"{where}the prompt is empty: give the user's request to judge")
    if response is not None and not response.strip():
        raise GRError(f"{where}the response is empty: leave it out when there is no AI response")


def read_requests(path: str) -> list[tuple[int, str, str | None]]:
    """(line number, prompt, response or None) of each line of a JSON-lines file."""
    items = []
    for n, row in read_jsonl_lines(path):
        if not isinstance(row.get("prompt"), str):
            raise GRError(f'{path}: line {n} has no string "prompt" (lines are {{"prompt": ..., "response": ...}})')
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise GRError(f'{path}: line {n}: "response" must be a string or null')
        check_text(row["prompt"], response, f"{path}: line {n}: ")
        items.append((n, row["prompt"], response))
    if not items:
        raise GRError(f"{path} holds no lines to judge")
    return items


def record(line, prompt, response, model: str, verdict: Verdict) -> dict:
    """One result line."""
    head = {"line": line} if line is not None else {}
    return {**head, "model": model, "prompt": prompt, "response": response, **verdict.as_dict()}


def describe(result: dict) -> str:
    """The short verdict printed after the streamed reasoning: labels, with P(positive) where known."""
    def read(task):
        p = result["probabilities"][task]
        return result["labels"][task] + ("" if p is None else f" (P({LABELS[task][0]}) = {p:.3f})")

    response = (f"{read('completion')}; {read('response')}" if result["response"] is not None
                else "no response given")
    flags = [name for name in ("parse_error", "hit_max_new_tokens") if result[name]]
    flags += [f"input_truncated ({result['input_truncated']} tokens cut)"] if result["input_truncated"] else []
    return f"Request:  {read('request')}\nResponse: {response}" + (f"\nFlags:    {', '.join(flags)}" if flags else "")


def warn_cut(verdict: Verdict, guard: Guard, where: str = "") -> None:
    if verdict.input_truncated:
        print(f"warning: {where}the input is longer than the {guard.budget} tokens the model's context of "
              f"{guard.model.config.max_position_embeddings} leaves for it; cut {verdict.input_truncated} tokens "
              "off the end of the user's text", file=sys.stderr)


def guard_one(guard: Guard, prompt, response, model: str, stream: bool, fast: bool = False) -> dict:
    """Judge one interaction; with `stream`, print the output to stdout as it is generated."""
    made, shown = [], ""

    def show(_, token):
        # Decode everything so far and print only what is new, so a character split over tokens prints
        # whole; a text ending in U+FFFD is waiting for the rest of its character.
        nonlocal shown
        made.append(token)
        text = guard.tokenizer.decode(made)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    [verdict] = guard.judge([(prompt, response)], fast=fast, on_token=show if stream else None)
    if stream:
        sys.stdout.write(verdict.output[len(shown):] + "\n")
    warn_cut(verdict, guard)
    return record(None, prompt, response, model, verdict)


def guard_file(guard: Guard, items, path: str, model: str, batch_size: int, write, fast: bool = False) -> Counter:
    """Judge the lines of a file in batches, in file order, handing each result to `write` when made;
    returns how many results raised each flag."""
    step = batch_size * 4  # a few batches at a time: sorted by length inside, written in order after
    flags = Counter()
    for start in range(0, len(items), step):
        chunk = items[start:start + step]
        verdicts = guard.judge([(p, r) for _, p, r in chunk], batch_size=batch_size, fast=fast,
                               progress=f"guarding {start + len(chunk)}/{len(items)}")
        for (n, p, r), verdict in zip(chunk, verdicts):
            warn_cut(verdict, guard, f"{path}: line {n}: ")
            write(record(n, p, r, model, verdict))
            flags.update(name for name in ("parse_error", "input_truncated", "hit_max_new_tokens") if getattr(verdict, name))
    return flags


def already_judged(out: Path, items, model: str) -> set[int]:
    """Line numbers of `items` that `out` already holds results for (from an interrupted run)."""
    if not out.exists():
        return set()
    lines = {n: (p, r) for n, p, r in items}
    done = set()
    for row in read_jsonl(out, partial_ok=True):
        if row.get("model") != model:
            raise GRError(f"{out} holds results of another model ({row.get('model')}): write to another --out file")
        if lines.get(row.get("line")) == (row.get("prompt"), row.get("response")):
            done.add(row["line"])
    return done


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
    parser.add_argument("--out", default=None, help="with --file: write the JSON lines here (default: stdout); "
                                                    "a rerun continues an interrupted one")
    parser.add_argument("--batch-size", type=int, default=8, help="with --file: interactions generated together")
    parser.add_argument("--fast", action="store_true", help="no reasoning: the labels and their probabilities "
                                                            "from one prefill and a few tokens")
    args = parser.parse_args(argv)
    with user_errors():
        # Everything the user gave is checked before the model loads.
        if (args.prompt is None) == (args.file is None):
            raise GRError("give either a PROMPT to judge or --file IN.jsonl (not both)")
        if args.out is not None and args.file is None:
            raise GRError("--out writes the results of --file; without --file the result goes to stdout")
        at_least(args.max_new_tokens, 1, "--max-new-tokens")
        at_least(args.batch_size, 1, "--batch-size")
        check_device(args.device)
        if args.file is None:
            check_text(args.prompt, args.response)
        else:
            items = read_requests(args.file)
            if args.out is not None:
                check_writable(args.out)
                done = already_judged(Path(args.out), items, args.model)
                items = [item for item in items if item[0] not in done]
                if done:
                    print(f"{args.out} already holds {len(done)} of these lines; judging the other {len(items)}",
                          file=sys.stderr)
        guard = Guard.load(args.model, args.device, args.dtype, args.max_new_tokens)
        if args.file is not None:
            appender = JsonlAppender(args.out) if args.out is not None else None
            write = appender.write if appender else lambda row: (sys.stdout.write(dumps(row) + "\n"), sys.stdout.flush())
            flags = guard_file(guard, items, args.file, args.model, args.batch_size, write, args.fast)
            if appender:
                appender.close()
            print(f"judged {len(items)} lines: {flags['parse_error']} parse errors, {flags['input_truncated']} inputs "
                  f"cut to fit, {flags['hit_max_new_tokens']} outputs stopped at --max-new-tokens", file=sys.stderr)
        elif args.json or args.fast:
            result = guard_one(guard, args.prompt, args.response, args.model, False, args.fast)
            print(json.dumps(result, ensure_ascii=False) if args.json else f"{result['output']}\n=== verdict ===\n{describe(result)}")
        else:
            result = guard_one(guard, args.prompt, args.response, args.model, True)
            print(f"\n=== verdict ===\n{describe(result)}")


if __name__ == "__main__":
    main()
