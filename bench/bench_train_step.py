"""One R-SFT training step (forward, backward, AdamW) of our model against transformers' LlamaForCausalLM.

    python bench/bench_train_step.py [--model DIR] [--dtype float32] [--batch 4] [--seq 512] [--steps 3]

Both get the same batch: shipped GuardReasoner rows, tokenized with the checkpoint's tokenizer, prompt
masked with -100, cut to --seq tokens. Each implementation runs in its own process, twice, alternating,
so their memory figures do not mix and both see the same machine load; the best step time counts.
Memory is the process's peak resident set size during the steps, and that peak minus the size after
loading the model (the step's own memory: activations, gradients, AdamW state). Not a test.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch(folder, size: int, seq: int):
    from gr.checkpoint import load_tokenizer
    from gr.data import collate, encode_rows, load_shipped

    tok = load_tokenizer(folder)
    examples, _ = encode_rows(tok, load_shipped()[:size], "raw", cutoff=seq)
    b = collate(examples, tok.pad_id)
    return b["input_ids"], b["labels"]


def worker(args) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    ids, labels = batch(args.model, args.batch, args.seq)
    if args.worker == "ours":
        from gr.checkpoint import load_model
        from gr.losses import output_positions, sft_loss

        model = load_model(args.model, dtype=dtype).train()

        def loss_fn():  # as gr.rsft.SFTTask does: logits at the output tokens only
            return sft_loss(model(ids, logits_at=output_positions(labels)), labels)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).train()

        def loss_fn():
            return model(input_ids=ids, labels=labels).loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loaded = rss_mb()
    times, losses = [], []
    for _ in range(args.steps + 1):  # the first step allocates AdamW's state: not timed
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"seconds": min(times[1:]), "peak_mb": rss_mb(), "step_mb": rss_mb() - loaded, "first_loss": losses[0],
            "tokens": int(ids.numel())}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder (default: the make-smollm2 checkpoint)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=512, help="longest sequence (tokens)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per implementation, alternating")
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model is None:
        args.model = subprocess.run([str(ROOT.parent / "shared/tools/make-smollm2")], capture_output=True,
                                    text=True, check=True).stdout.split()[-1]
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {"ours": [], "hf": []}
    for _ in range(args.rounds):
        for name in results:
            cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--dtype", args.dtype,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    best = {n: min(r, key=lambda x: x["seconds"]) for n, r in results.items()}
    print(f"model {args.model}, {args.dtype}, batch {args.batch} x <= {args.seq} tokens "
          f"({best['ours']['tokens']} positions), {torch.get_num_threads()} threads")
    print(f"first loss: ours {best['ours']['first_loss']:.5f}, transformers {best['hf']['first_loss']:.5f}")
    print(f"{'':14}{'step s':>8}{'tokens/s':>10}{'peak RSS MB':>13}{'step MB':>9}")
    for name, label in (("ours", "ours"), ("hf", "transformers")):
        r = best[name]
        print(f"{label:14}{r['seconds']:8.3f}{r['tokens'] / r['seconds']:10.0f}{r['peak_mb']:13.0f}{r['step_mb']:9.0f}")
    o, h = best["ours"], best["hf"]
    print(f"speed ratio (transformers time / ours): {h['seconds'] / o['seconds']:.2f}x; "
          f"step memory ours / transformers: {o['step_mb'] / h['step_mb']:.2f}")


if __name__ == "__main__":
    main()
