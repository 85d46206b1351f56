"""Prefill and decode speed of gr.generate against transformers' generate, same checkpoint and dtype.

    python bench/bench_generate.py [--model DIR] [--dtypes float32 bfloat16] [--prompt-len 256] [--new 64]

Prefill tokens/s = batch * prompt length / time of a 1-token generation; decode tokens/s = batch *
(new - 1) / (time of a `new`-token generation - time of the 1-token one). Each is the best of `--repeats`
runs, ours and transformers' taken in turn so that both see the same machine load. Not a test.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gr.checkpoint import load_model  # noqa: E402
from gr.generate import generate  # noqa: E402


def default_model() -> str:
    return subprocess.run([str(ROOT.parent / "shared/tools/make-smollm2")], capture_output=True, text=True,
                          check=True).stdout.split()[-1]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder (default: the make-smollm2 checkpoint)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtypes to compare")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=64, help="new tokens per row in the decode run")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (the best counts)")
    args = p.parse_args()
    folder = args.model or default_model()
    print(f"model {folder}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU count {os.cpu_count()}")
    print(f"{'dtype':9} {'batch':>5} {'ours prefill':>13} {'hf prefill':>11} {'ratio':>6} {'ours decode':>12} {'hf decode':>10} {'ratio':>6}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours = load_model(folder, dtype=dtype)
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        for batch in args.batches:
            ids = torch.randint(100, 10000, (batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
            prompts = ids.tolist()

            def run_ours(new):
                return lambda: generate(ours, prompts, max_new_tokens=new)

            def run_ref(new):
                cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
                return lambda: ref.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)

            best = {}
            with torch.inference_mode():
                run_ours(2)(), run_ref(2)()  # warm-up
                for _ in range(args.repeats):
                    for name, make in (("ours", run_ours), ("hf", run_ref)):
                        for new in (1, args.new):
                            t = timed(make(new))
                            best[name, new] = min(best.get((name, new), t), t)
            pre = {n: batch * args.prompt_len / best[n, 1] for n in ("ours", "hf")}
            dec = {n: batch * (args.new - 1) / (best[n, args.new] - best[n, 1]) for n in ("ours", "hf")}
            print(f"{dtype_name:9} {batch:5d} {pre['ours']:13.0f} {pre['hf']:11.0f} {pre['ours'] / pre['hf']:6.2f}"
                  f" {dec['ours']:12.1f} {dec['hf']:10.1f} {dec['ours'] / dec['hf']:6.2f}")


if __name__ == "__main__":
    main()
