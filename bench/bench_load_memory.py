"""Peak memory of loading a checkpoint with gr, against the size of its weights.

    python bench/bench_load_memory.py [--model DIR] [--dtype bfloat16]

Two fresh processes under /usr/bin/time -v: one only imports torch and gr (the interpreter's own
footprint), one also loads the model. Prints the weights' size, both peaks (maximum resident set size)
and what loading added, as a multiple of the weights. Not a test.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import sys, torch
sys.path.insert(0, {root!r})
from gr.checkpoint import load_model
if {load}:
    model = load_model({model!r}, dtype=torch.{dtype})
    print(sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def peak_kb(code: str) -> tuple[int, str]:
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)), result.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder (default: the make-smollm2 checkpoint)")
    p.add_argument("--dtype", default="bfloat16", help="dtype to load into")
    args = p.parse_args()
    model = args.model or subprocess.run([str(ROOT.parent / "shared/tools/make-smollm2")], capture_output=True,
                                         text=True, check=True).stdout.split()[-1]
    base, _ = peak_kb(CODE.format(root=str(ROOT), load=False, model=model, dtype=args.dtype))
    peak, out = peak_kb(CODE.format(root=str(ROOT), load=True, model=model, dtype=args.dtype))
    weights = int(out.split()[-1]) / 1024**2
    base, peak = base / 1024, peak / 1024
    print(f"{model} in {args.dtype}: weights {weights:.0f} MiB")
    print(f"peak RSS: imports only {base:.0f} MiB, imports + loading {peak:.0f} MiB")
    print(f"loading added {peak - base:.0f} MiB = {(peak - base) / weights:.2f}x the weights "
          f"(whole process: {peak / weights:.2f}x)")


if __name__ == "__main__":
    main()
