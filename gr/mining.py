"""Hard-sample mining (GuardReasoner, section 5): where the R-SFT model is unsure, make preference pairs.

1. Sample k outputs per training row (temperature 0.7, top-p 0.95) from the R-SFT model.
2. Read each output's labels with the shared parser; an output without a full Answers block has no vote.
3. A row is hard when, for one task, some outputs are right and some wrong. Tasks are checked in the
   paper's order, first match wins: the request label; else the response label; else the completion
   (refusal) label -- the last two only when the row has an AI response and a gold label for the task.
4. chosen = the longest right output, rejected = the longest wrong output (characters).
5. Hardness d = #wrong - #right; weights min-max normalized over the mined set into [0.8, 1.2].
6. Ensemble: models trained with one source left out mine the rows of that source (which they never
   saw); their hard samples join the main model's, de-duplicated by input, weights recomputed.
Generations are cached per model (JSON lines, one row per line), so an interrupted run resumes.
Under torchrun the ranks sample different chunks of rows and every rank reads all of them back.
"""

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from gr import GRError, distributed
from gr.files import JsonlAppender, read_jsonl, write_jsonl
from gr.guard import Guard
from gr.prompts import PAPER_ORDER, parse_answers, split_input


@dataclass
class HardSample:
    row: dict  # the training row: instruction, input, output (gold), source
    task: str  # the first task on which the outputs disagreed
    chosen: str  # longest output right on that task
    rejected: str  # longest output wrong on that task
    d: int  # number wrong - number right
    weight: float = 1.0


def find_hard(row: dict, outputs: list[str]) -> HardSample | None:
    """The row's preference pair if its sampled outputs disagree on a task (paper order), else None."""
    gold = parse_answers(row["output"])
    _, response = split_input(row["input"])
    votes = [(o, parse_answers(o)) for o in outputs]
    votes = [(o, a) for o, a in votes if a.complete]
    for task in PAPER_ORDER:  # section 5, item 3: first match wins
        if task != "request" and (response is None or gold.get(task) is None):
            continue
        right = [o for o, a in votes if a.get(task) == gold.get(task)]
        wrong = [o for o, a in votes if a.get(task) != gold.get(task)]
        if right and wrong:
            return HardSample(row, task, max(right, key=len), max(wrong, key=len), len(wrong) - len(right))
    return None


def normalize_weights(samples: list[HardSample], spread: float = 0.2) -> list[HardSample]:
    """w = 1 - spread + 2 * spread * (d - min d) / (max d - min d); every w = 1 when all d are equal."""
    if samples:
        lo, hi = min(s.d for s in samples), max(s.d for s in samples)
        for s in samples:
            s.weight = 1.0 if hi == lo else 1.0 - spread + 2 * spread * (s.d - lo) / (hi - lo)
    return samples


def sample_outputs(guard: Guard, rows: list[dict], cache_path, *, k: int = 4, temperature: float = 0.7,
                   top_p: float = 0.95, batch_size: int = 8, seed: int = 0, chunk: int = 64,
                   progress: str = "mining") -> list[list[str]]:
    """k sampled outputs per row, cached in `cache_path` (one JSON line per row) and resumed from it.

    A cached line counts only for the same row input (a hash of it is kept); the caller names the cache
    after the model and the sampling settings.
    Row i is seeded by seed + i, so a resumed run draws exactly the outputs a single uninterrupted run
    would. Under torchrun rank r samples every world-th chunk of `chunk` rows, so each chunk is batched
    just as in a single process, and the outputs are identical, not only equal in distribution. Rank
    r > 0 writes its own file beside the cache (lines of several writers would interleave); all of them
    count as the cache.
    """
    cache_path = Path(cache_path)
    keys = [hashlib.sha256(r["input"].encode()).hexdigest()[:16] for r in rows]
    done = _read_cache(cache_path, keys, k)
    todo = [i for i in range(len(rows)) if i not in done]
    if todo:
        print(f"{progress}: {len(done)} rows cached in {cache_path}, {len(todo)} to sample ({k} outputs each)")
    distributed.barrier()  # every rank has read the cache before any rank adds to it: all see the same todo
    own = cache_path if distributed.is_main() else cache_path.with_name(f"{cache_path.name}.rank{distributed.rank()}")
    with JsonlAppender(own) as appender:
        for start in distributed.share(range(0, len(todo), chunk)):
            part = todo[start:start + chunk]
            prompts = [rows[i]["instruction"] + "\n" + rows[i]["input"] for i in part]
            outs = guard.generate(prompts, batch_size=batch_size, n=k, temperature=temperature, top_p=top_p,
                                  seeds=[seed + i for i in part],
                                  progress=f"{progress} {start + len(part)}/{len(todo)}" if distributed.is_main() else False)
            for i, samples in zip(part, outs):
                done[i] = [c.text for c in samples]
                appender.write({"index": i, "input": keys[i], "outputs": done[i]})
    distributed.barrier()  # every rank's rows are written
    if len(done) < len(rows):  # under torchrun: the other ranks sampled the rest
        done = _read_cache(cache_path, keys, k)
    return [done[i] for i in range(len(rows))]


def _read_cache(cache_path: Path, keys: list[str], k: int) -> dict[int, list[str]]:
    """Cached outputs by row index: the cache file and the files of other torchrun ranks beside it."""
    done = {}
    for path in [cache_path, *sorted(cache_path.parent.glob(f"{cache_path.name}.rank*"))]:
        for entry in read_jsonl(path, partial_ok=True) if path.exists() else []:
            i = entry["index"]
            if i < len(keys) and entry["input"] == keys[i] and len(entry["outputs"]) == k:
                done[i] = entry["outputs"]
    return done


def mine(rows: list[dict], outputs: list[list[str]]) -> list[HardSample]:
    """Hard samples of one model, weights normalized over them."""
    return normalize_weights([h for row, outs in zip(rows, outputs) if (h := find_hard(row, outs))])


def merge_ensemble(main: list[HardSample], left_out: dict[str, list[HardSample]]) -> list[HardSample]:
    """Section 5, item 7: the main model's hard samples, plus, per source, the hard samples of the model
    that did not train on that source (only rows of that source), de-duplicated by input; weights are
    recomputed over the merged set."""
    merged, seen = [], set()
    extra = [h for source, samples in left_out.items() for h in samples if h.row.get("source") == source]
    for h in main + extra:
        if h.row["input"] not in seen:
            seen.add(h.row["input"])
            merged.append(h)
    return normalize_weights(merged)


def summarize(n_rows: int | None, hard: list[HardSample]) -> dict:
    """Rows mined, hard samples per task and per source, and a histogram of the weights."""
    edges = [0.8, 0.9, 1.0, 1.1, 1.2]
    bins = Counter(min(int((h.weight - 0.8) / 0.1 + 1e-9), 3) for h in hard)
    return {
        "rows_mined": n_rows,
        "hard_samples": len(hard),
        "per_task": dict(Counter(h.task for h in hard)),
        "per_source": dict(Counter(h.row.get("source", "?") for h in hard)),
        "weight_histogram": {f"{edges[b]:.1f}-{edges[b + 1]:.1f}": bins.get(b, 0) for b in range(4)},
    }


def save_hard_samples(hard: list[HardSample], path) -> None:
    write_jsonl(path, [asdict(h) for h in hard])


def load_hard_samples(path) -> list[HardSample]:
    """Hard samples saved by `save_hard_samples`; a file of anything else is a user error."""
    names = {f.name for f in fields(HardSample)}
    samples = []
    for n, entry in enumerate(read_jsonl(path), 1):
        row = entry.get("row")
        if set(entry) - names or not {"row", "task", "chosen", "rejected", "d"} <= set(entry) or not isinstance(row, dict) \
                or not all(isinstance(row.get(key), str) for key in ("instruction", "input", "output")) \
                or not isinstance(entry["chosen"], str) or not isinstance(entry["rejected"], str):
            raise GRError(f"{path}: line {n} is not a hard sample (written by train_dpo.py as hard_samples.jsonl)")
        samples.append(HardSample(**entry))
    if not samples:
        raise GRError(f"{path} holds no hard samples")
    return samples
