"""Evaluation (paper section 7): run a guard over the benchmarks, write prediction files in the authors'
format, score them with the official rules (gr.scoring), and the dev-set figures the training scripts print.

    python -m gr.evaluate score PREDICTIONS...          # score prediction files or folders
    python -m gr.evaluate run --model M [--out DIR]     # generate, write <Benchmark>.jsonl, score

`run` judges each distinct interaction once, whichever benchmarks hold it (the two XSTest files share
theirs): greedy outputs for instruction + "\\n" + input (BOS added), at most 2048 new tokens as in the paper.
Outputs are appended to DIR/generations.jsonl as they are made, so a killed run loses at most one batch
and a rerun generates only what is missing; the prediction files are written from it at the end.
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from gr import GRError, user_errors
from gr.cli import DTYPES, at_least
from gr.data import BENCHMARKS, load_benchmark
from gr.files import JsonlAppender, check_out_dir, read_jsonl, write_jsonl
from gr.guard import Guard
from gr.prompts import TASKS, parse_answers, split_input
from gr.scoring import format_tables, score_benchmark, score_files, summary

GENERATIONS = "generations.jsonl"


def run_key(guard: Guard, model: str) -> str:
    """A fingerprint of what decides an output besides its prompt: the model (its folder and weight files,
    or its hub id) and the generation settings. Outputs cached under another key are not reused."""
    folder = Path(model)
    weights = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.safetensors"))]
    identity = [str(folder.resolve()) if folder.is_dir() else model, weights, guard.max_new_tokens,
                str(guard.model.lm_head.weight.dtype)]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def run_benchmarks(guard: Guard, names, out_dir, *, model_id: str, benchmark_dir=None, limit=None,
                   batch_size: int = 8) -> dict:
    """Judge every benchmark row (once per distinct interaction), write out_dir/<Benchmark>.jsonl, score."""
    out_dir = Path(out_dir)
    benchmarks = {name: load_benchmark(name, benchmark_dir)[:limit] for name in names}  # fail before generating
    prompts, texts = {}, {}  # fitted prompt text -> tokens cut (one per distinct interaction); texts per benchmark
    for name, rows in benchmarks.items():
        texts[name] = []
        for i, row in enumerate(rows):
            try:
                text, n = guard.prompt(*split_input(row["input"]), row["instruction"])
            except ValueError as e:
                raise GRError(f"{name} row {i}: {e}") from None
            prompts[text] = n
            texts[name].append(text)
        cut = sum(prompts[t] > 0 for t in texts[name])
        if cut:
            print(f"warning: {name}: {cut} prompts were longer than the {guard.budget} tokens the model's context "
                  f"leaves for a prompt; their user text was cut", file=sys.stderr)
    settings = run_key(guard, model_id)
    cache = out_dir / GENERATIONS
    done = {}
    if cache.exists():
        for entry in read_jsonl(cache, partial_ok=True):
            if entry.get("settings") == settings:
                done[entry["prompt"]] = entry
    todo = sorted((p for p in prompts if p not in done), key=len)
    if done:
        print(f"{len(prompts) - len(todo)} of {len(prompts)} interactions already judged in {cache}", file=sys.stderr)
    with JsonlAppender(cache) as appender, tqdm(total=len(todo), desc="judging", disable=not todo) as bar:
        started, tokens = time.perf_counter(), 0
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for text, [c] in zip(chunk, guard.generate(chunk, batch_size=batch_size)):
                done[text] = {"settings": settings, "prompt": text, "predict": c.text, "new_tokens": len(c.tokens),
                              "seconds": round(c.seconds, 3), "input_truncated": prompts[text]}
                appender.write(done[text])
                tokens += len(c.tokens)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}", refresh=False)
            bar.update(len(chunk))
    results = {}
    for name, rows in benchmarks.items():
        predictions = [{"prompt": text, "label": row["output"], "predict": done[text]["predict"]}
                       for text, row in zip(texts[name], rows)]
        write_jsonl(out_dir / f"{name}.jsonl", predictions)
        results[name] = score_benchmark(name, predictions, benchmark_rows=rows)
    return results


def dev_scores(rows: list[dict], outputs: list[str]) -> dict:
    """Parse rate and per-task accuracy of outputs against the Answers blocks of the rows' outputs."""
    predicted = [parse_answers(o) for o in outputs]
    golds = [parse_answers(row["output"]) for row in rows]
    accuracy = {}
    for task in TASKS:
        judged = [(g.get(task), p.get(task)) for g, p in zip(golds, predicted) if g.get(task) is not None]
        accuracy[task] = sum(g == p for g, p in judged) / len(judged) if judged else None
    parse_rate = sum(p.complete for p in predicted) / len(predicted) if predicted else 0.0
    return {"parse_rate": parse_rate, "accuracy": accuracy, "outputs": outputs}


def dev_metrics(guard: Guard, rows: list[dict], *, batch_size: int = 16) -> dict:
    """Greedy outputs for GuardReasonerTrain-format rows ({instruction, input, output}) and their figures:
    {"parse_rate", "accuracy": {task: share or None}, "outputs"}."""
    was_training = guard.model.training
    guard.model.eval()
    try:
        outs = guard.generate([row["instruction"] + "\n" + row["input"] for row in rows], batch_size=batch_size)
    finally:
        guard.model.train(was_training)
    return dev_scores(rows, [o[0].text for o in outs])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gr.evaluate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score prediction files ({prompt, label, predict} JSON lines)")
    score.add_argument("paths", nargs="+", help="<Benchmark>.jsonl files, or folders holding them")
    run = sub.add_parser("run", help="run a model over benchmark files, write prediction files, score them")
    run.add_argument("--model", required=True, help="checkpoint folder or hub id")
    run.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS), metavar="NAME",
                     help="benchmarks to run (default: all 11)")
    run.add_argument("--out", default=None, help="folder for the prediction files (default: out/eval-<model name>)")
    run.add_argument("--limit", type=int, default=None, help="only the first N rows of each benchmark")
    run.add_argument("--max-new-tokens", type=int, default=2048, help="new tokens per output (paper: 2048)")
    run.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    run.add_argument("--device", default="cpu", help="cpu or cuda")
    run.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights dtype")
    for p in (score, run):
        p.add_argument("--benchmark-dir", default=None,
                       help="folder holding the benchmark files (default: downloaded once into the cache)")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    with user_errors():
        if args.command == "score":
            results = score_files(args.paths, args.benchmark_dir)
        else:
            for flag in ("max_new_tokens", "batch_size", "limit"):
                at_least(getattr(args, flag), 1, "--" + flag.replace("_", "-"))
            out = check_out_dir(args.out or Path("out") / f"eval-{Path(args.model.rstrip('/')).name}")
            JsonlAppender(out / GENERATIONS).close()  # fail now, not after the first batch, if it cannot be written
            guard = Guard.load(args.model, args.device, args.dtype, args.max_new_tokens)
            results = run_benchmarks(guard, args.benchmarks, out, model_id=args.model, benchmark_dir=args.benchmark_dir,
                                     limit=args.limit, batch_size=args.batch_size)
            print(f"predictions written to {out}", file=sys.stderr)
    print(json.dumps(summary(results), indent=2) if args.json else format_tables(results))


if __name__ == "__main__":
    main()
