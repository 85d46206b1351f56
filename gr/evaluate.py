"""Evaluation (paper section 7): run a guard over the benchmarks, write prediction files in the authors'
format, score them with the official rules (gr.scoring), and the dev-set figures the training scripts print.

    python -m gr.evaluate score PREDICTIONS...          # score prediction files or folders
    python -m gr.evaluate run --model M [--out DIR]     # generate, write <Benchmark>.jsonl, score

`run` judges each distinct interaction once, whichever benchmarks hold it (the two XSTest files share
theirs), through gr.guard: greedy outputs for instruction + "\\n" + input (BOS added), at most 2048 new
tokens as in the paper, or fast verdicts with --fast. Verdicts are appended to DIR/generations.jsonl as
they are made, so a killed run loses at most one batch and a rerun judges only what is missing; the
prediction files are written from it at the end, with each verdict's label probabilities and flags.
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
from gr.files import JsonlAppender, check_out_dir, dumps, read_jsonl, write_jsonl, write_text
from gr.guard import Guard
from gr.prompts import TASKS, parse_answers, split_input
from gr.scoring import format_tables, score_benchmark, score_files, summary

GENERATIONS = "generations.jsonl"
DEV_REPORT = "dev_report.json"


def run_key(guard: Guard, model: str, fast: bool, *more) -> str:
    """A fingerprint of what decides a verdict besides its interaction: the model (its folder and weight
    files, or its hub id) and the settings. Verdicts cached under another key are not reused."""
    folder = Path(model)
    weights = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.safetensors"))]
    identity = [str(folder.resolve()) if folder.is_dir() else model, weights, guard.max_new_tokens,
                str(guard.model.lm_head.weight.dtype), "fast" if fast else "reasoning", *more]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def run_benchmarks(guard: Guard, names, out_dir, *, model_id: str, benchmark_dir=None, limit=None,
                   batch_size: int = 8, fast: bool = False) -> tuple[dict, float]:
    """Judge every benchmark row (once per distinct interaction), write out_dir/<Benchmark>.jsonl, score.
    Returns the scores and the mean seconds per verdict (of the verdicts made by this run and earlier runs)."""
    out_dir = Path(out_dir)
    benchmarks = {name: load_benchmark(name, benchmark_dir)[:limit] for name in names}  # fail before judging
    interactions, keys = {}, {}  # one key per distinct (prompt, response); each benchmark's keys in row order
    for name, rows in benchmarks.items():
        keys[name] = []
        for i, row in enumerate(rows):
            try:
                prompt, response = split_input(row["input"])
            except ValueError as e:
                raise GRError(f"{name} row {i}: {e}") from None
            key = dumps([prompt, response])
            if key not in interactions:
                interactions[key] = (prompt, response, *guard.prompt(prompt, response))
            keys[name].append(key)
        cut = sum(interactions[k][3] > 0 for k in keys[name])
        if cut:
            print(f"warning: {name}: {cut} prompts were longer than the {guard.budget} tokens the model's context "
                  f"leaves for a prompt; their user text was cut", file=sys.stderr)
    run = run_key(guard, model_id, fast)
    cache = out_dir / GENERATIONS
    done = {}
    if cache.exists():
        done = {e["key"]: e for e in read_jsonl(cache, partial_ok=True) if e.get("run") == run}
    todo = sorted((k for k in interactions if k not in done), key=lambda k: len(interactions[k][2]))
    if done:
        print(f"{len(interactions) - len(todo)} of {len(interactions)} interactions already judged in {cache}",
              file=sys.stderr)
    with JsonlAppender(cache) as appender, tqdm(total=len(todo), desc="judging", disable=not todo) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            verdicts = guard.judge([interactions[k][:2] for k in chunk], batch_size=batch_size, fast=fast)
            for key, verdict in zip(chunk, verdicts):
                done[key] = {"run": run, "key": key, **verdict.as_dict()}
                appender.write(done[key])
            bar.update(len(chunk))
    results = {}
    for name, rows in benchmarks.items():
        predictions = [{"prompt": interactions[k][2], "label": row["output"], "predict": done[k]["output"],
                        **{f: done[k][f] for f in ("probabilities", "parse_error", "input_truncated",
                                                   "hit_max_new_tokens", "seconds")}}
                       for k, row in zip(keys[name], rows)]
        write_jsonl(out_dir / f"{name}.jsonl", predictions)
        results[name] = score_benchmark(name, predictions, benchmark_rows=rows)
    seconds = sum(done[k]["seconds"] for k in interactions) / len(interactions)
    return results, seconds


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


def dev_metrics(guard: Guard, rows: list[dict], *, batch_size: int = 16, fast: bool = False) -> dict:
    """Verdicts for GuardReasonerTrain-format rows ({instruction, input, output}) and their figures:
    {"parse_rate", "accuracy": {task: share or None}, "outputs"}."""
    was_training = guard.model.training
    guard.model.eval()
    try:
        verdicts = guard.judge([split_input(row["input"]) for row in rows], batch_size=batch_size, fast=fast,
                               probabilities=False)
    finally:
        guard.model.train(was_training)
    return dev_scores(rows, [v.output for v in verdicts])


def dev_report(guard: Guard, rows: list[dict], folder, *, batch_size: int = 32) -> dict:
    """dev_metrics of the model saved in `folder`, kept in folder/dev_report.json: a later stage that starts
    from this model (HS-DPO's "before") reads them instead of generating them again."""
    path = Path(folder) / DEV_REPORT
    key = run_key(guard, str(folder), False, dumps([row["input"] for row in rows]))
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["metrics"]
    metrics = dev_metrics(guard, rows, batch_size=batch_size)
    write_text(path, json.dumps({"key": key, "metrics": metrics}, ensure_ascii=False) + "\n")
    return metrics


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
    run.add_argument("--fast", action="store_true", help="fast verdicts: no reasoning, the Answers block at once")
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
            results, seconds = run_benchmarks(guard, args.benchmarks, out, model_id=args.model, fast=args.fast,
                                              benchmark_dir=args.benchmark_dir, limit=args.limit,
                                              batch_size=args.batch_size)
            print(f"predictions written to {out}; {seconds:.2f} s per verdict "
                  f"({'fast' if args.fast else 'with reasoning'}, batches of {args.batch_size})", file=sys.stderr)
    print(json.dumps(summary(results), indent=2) if args.json else format_tables(results))


if __name__ == "__main__":
    main()
