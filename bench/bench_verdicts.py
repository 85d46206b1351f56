"""Seconds per verdict, one interaction at a time: full reasoning against the fast verdict, in one run.

    python bench/bench_verdicts.py --model out/hsdpo-small [--n 40] [--max-new-tokens 512]

A guard that checks each request inline answers one interaction at a time, so this measures latency at
batch 1 (the paper's Table 9 does the same on a GPU). The interactions are the first --n dev rows of the
shipped data, each judged with reasoning (greedy, stopping at the model's own Answers block, label
probabilities included) and fast (one prefill on the cached instruction, then a few tokens per field).
Prints the mean seconds and new tokens per verdict of each mode and the ratio. Not a test.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gr.data import load_shipped  # noqa: E402
from gr.guard import Guard  # noqa: E402
from gr.prompts import split_input  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--n", type=int, default=40, help="dev interactions judged in each mode")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reasoning")
    args = p.parse_args()
    guard = Guard.load(args.model, max_new_tokens=args.max_new_tokens)
    interactions = [split_input(row["input"]) for row in load_shipped("dev")[:args.n]]
    guard.judge(interactions[:1], fast=True)  # warm up, and compute the instruction's cached keys and values
    results = {}
    for mode in ("reasoning", "fast"):
        seconds, tokens = [], []
        for interaction in interactions:
            began = time.perf_counter()
            [verdict] = guard.judge([interaction], fast=mode == "fast")
            seconds.append(time.perf_counter() - began)
            tokens.append(verdict.new_tokens)
        results[mode] = (statistics.mean(seconds), statistics.mean(tokens))
    print(f"{args.model}: {len(interactions)} dev interactions, one at a time, {torch.get_num_threads()} threads")
    print(f"{'mode':10} {'s / verdict':>12} {'new tokens':>11}")
    for mode, (s, n) in results.items():
        print(f"{mode:10} {s:12.3f} {n:11.1f}")
    print(f"fast is {results['reasoning'][0] / results['fast'][0]:.1f}x less time per verdict")


if __name__ == "__main__":
    main()
