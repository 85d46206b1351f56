"""Hard-sample mining and HS-DPO (GuardReasoner, sections 5 and 6).

    python train_dpo.py                  # mine out/sft on the shipped data, then HS-DPO on the CPU
    python train_dpo.py --preset small   # mine out/sft-small (SmolLM2), then HS-DPO: the small guard
    python train_dpo.py --left-out aegis=out/sft-no-aegis --left-out wildguard=out/sft-no-wildguard
    python train_dpo.py --preset paper   # the authors' settings on GPU, from out/sft-paper
    torchrun --nproc_per_node=4 train_dpo.py --preset paper --batch-size 4 --grad-accum 64   # 4 GPUs, FSDP2

The R-SFT model samples k outputs per training row; rows where those outputs disagree become preference
pairs (longest right vs longest wrong output), weighted by how hard they were; then DPO trains the model
to prefer the right reasoning, with the R-SFT model as the frozen reference.
"""

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import train_sft
from gr import GRError, distributed, user_errors
from gr.checkpoint import find_resume, load_model, load_tokenizer, resolve
from gr.cli import add_training_args, apply_preset, at_least
from gr.data import SOURCES, load_data
from gr.evaluate import dev_report
from gr.files import write_text
from gr.guard import Guard
from gr.hsdpo import DPOTask, make_pairs
from gr.mining import load_hard_samples, merge_ensemble, mine, sample_outputs, save_hard_samples, summarize
from gr.trainer import TrainConfig, train

PRESETS = {
    # The small CPU run: mine the default R-SFT model, then a few epochs of HS-DPO.
    "default": dict(sft="out/sft", data="shipped", max_new_tokens=512, beta=0.1, ftx=1.0, lr=1e-4, epochs=3,
                    batch_size=8, grad_accum=1, cutoff=1024, template="raw", device="cpu", save_every=0,
                    gradient_checkpointing=False, out="out/hsdpo", report_max_new_tokens=512, mine_rows=0),
    # The small guard: mine 120 rows (k=4; 48 min with HS-DPO on a 2-core CPU, inside a 2-hour budget) with
    # the SmolLM2 R-SFT model (train_sft.py --preset small), then HS-DPO; section 6's recipe scaled to a
    # 135M model (beta and lr), not tuned on dev.
    "small": dict(sft="out/sft-small", data="shipped", max_new_tokens=384, beta=0.1, ftx=1.0, lr=1e-5, epochs=2,
                  batch_size=4, grad_accum=4, cutoff=1024, template="raw", device="cpu", save_every=10,
                  gradient_checkpointing=False, out="out/hsdpo-small", report_max_new_tokens=512, mine_rows=120),
    # Section 6: beta 0.01, ftx 2.0, lr 5e-6, 2 epochs, effective batch 256 pairs (1 x 256 accumulation on
    # one GPU; the authors ran 1 x 64 x 4 GPUs), cosine, no warmup, cutoff 2048; k=4 samples of <= 2048 tokens.
    "paper": dict(sft="out/sft-paper", data="guardreasoner", max_new_tokens=2048, beta=0.01, ftx=2.0, lr=5e-6,
                  epochs=2, batch_size=1, grad_accum=256, cutoff=2048, template="llama3", device="cuda", save_every=20,
                  gradient_checkpointing=True, out="out/hsdpo-paper", report_max_new_tokens=2048, mine_rows=0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=f"Hard-sample mining, then HS-DPO. Presets: {', '.join(PRESETS)}.")
    add_training_args(p, "pairs")
    p.add_argument("--sft", help="the R-SFT model: policy start, reference and miner (default: the preset's)")
    p.add_argument("--left-out", action="append", default=[], metavar="SOURCE=MODEL",
                   help="a model trained without SOURCE; it mines that source's rows (repeatable; section 5's ensemble)")
    p.add_argument("--data", help="training rows to mine: shipped, guardreasoner or a local file")
    p.add_argument("--mine-rows", type=int, help="mine only this many rows, drawn at random with --seed (0: all)")
    p.add_argument("--hard-samples", help="a hard_samples.jsonl mined before: skip mining and train on it")
    p.add_argument("--k", type=int, default=4, help="outputs sampled per row (at least 2, so that they can disagree)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for mining")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass for mining")
    p.add_argument("--max-new-tokens", type=int, help="longest sampled output")
    p.add_argument("--mine-batch-size", type=int, default=16, help="prompts per generation batch (x k samples)")
    p.add_argument("--beta", type=float, help="DPO temperature beta")
    p.add_argument("--ftx", type=float, help="weight of the SFT term on the chosen output")
    p.add_argument("--eval-every", type=int, default=10, help="steps between reward checks on the mined pairs")
    args = p.parse_args(argv)
    apply_preset(args, PRESETS)
    at_least(args.k, 2, "--k")
    for flag in ("max_new_tokens", "mine_batch_size"):
        at_least(getattr(args, flag), 1, "--" + flag.replace("_", "-"))
    at_least(args.mine_rows, 0, "--mine-rows")
    if not args.temperature > 0 or not 0 < args.top_p <= 1 or not args.beta > 0 or args.ftx < 0:
        raise GRError("--temperature and --beta must be above 0, --top-p in (0, 1], --ftx at least 0")
    args.left_out = dict(_source_model(item) for item in args.left_out)
    return args


def _source_model(item: str) -> tuple[str, str]:
    source, sep, model = item.partition("=")
    if not sep or source not in SOURCES:
        raise GRError(f"--left-out takes SOURCE=MODEL with SOURCE one of {', '.join(SOURCES)}, not '{item}'")
    return source, model


def sft_model(args) -> Path:
    """The R-SFT folder; the preset's own one is trained first (train_sft.py --preset ...) when it is missing."""
    if Path(args.sft).is_dir() or args.sft != PRESETS[args.preset]["sft"]:
        return resolve(args.sft)
    print(f"no R-SFT model at {args.sft}: running R-SFT first (python train_sft.py --preset {args.preset})")
    train_sft.main(["--preset", args.preset])
    return resolve(args.sft)


def rows_to_mine(args) -> list[dict]:
    rows = load_data(args.data)
    if args.mine_rows and args.mine_rows < len(rows):
        rows = random.Random(args.seed).sample(rows, args.mine_rows)
    return rows


def mine_with(folder, rows, args, out: Path, label: str):
    """Sample k outputs per row with the model in `folder` (cached under out/mining) and find hard samples."""
    guard = Guard.load(str(folder), args.device, max_new_tokens=args.max_new_tokens)
    settings = json.dumps([str(Path(folder).resolve()), args.k, args.temperature, args.top_p, args.max_new_tokens, args.seed])
    cache = out / "mining" / f"{label}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}.jsonl"
    outputs = sample_outputs(guard, rows, cache, k=args.k, temperature=args.temperature, top_p=args.top_p,
                             batch_size=args.mine_batch_size, seed=args.seed, progress=f"mining with {label}")
    return mine(rows, outputs)


def report(model, tok, dev, folder, args) -> dict | None:
    """Dev figures of the model saved in `folder` (kept there, so the R-SFT model's are read, not redone)."""
    if args.no_report or not dev or not distributed.is_main():  # under torchrun rank 0 reports
        return None
    return dev_report(Guard(model, tok, max_new_tokens=args.report_max_new_tokens), dev, folder)


def main(argv=None):
    args = parse_args(argv)
    args.device = distributed.init(args.device)
    started = time.time()
    out = Path(args.out)
    previous = out / "hard_samples.jsonl"
    if args.resume and find_resume(out) is None:
        raise GRError(f"nothing to resume: {out}/checkpoint holds no checkpoint (start without --resume)")
    # Everything a user gave is read before any model is trained, loaded or sampled.
    hard = rows = None
    if args.hard_samples:
        hard = load_hard_samples(args.hard_samples)
    elif args.resume and previous.exists():
        hard = load_hard_samples(previous)
    else:
        rows = rows_to_mine(args)
    dev = load_data("shipped", split="dev") if args.data == "shipped" else None
    out.mkdir(parents=True, exist_ok=True)
    folder = sft_model(args)
    if hard is None:
        hard = mine_with(folder, rows, args, out, "sft")
        if args.left_out:
            extra = {s: mine_with(m, [r for r in rows if r.get("source") == s], args, out, f"no-{s}") for s, m in args.left_out.items()}
            hard = merge_ensemble(hard, extra)
    if distributed.is_main():  # under torchrun every rank read all ranks' samples and found the same
        save_hard_samples(hard, previous)
    summary = summarize(None if rows is None else len(rows), hard)
    if distributed.is_main():
        write_text(out / "mining_summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"{'mined ' + str(len(rows)) + ' rows' if rows else 'mined before'}: {summary['hard_samples']} hard samples; "
          f"per task {summary['per_task']}; per source {summary['per_source']}; weights {summary['weight_histogram']}")
    if not hard:
        raise GRError("no hard samples: the R-SFT model's k outputs agree on every row; sample more (--k) or mine more rows")

    model = load_model(folder, device=args.device)
    tok = load_tokenizer(folder)
    before = report(model, tok, dev, folder, args)
    pairs = make_pairs(tok, hard, args.template, args.cutoff)
    task = DPOTask(pairs, tok.pad_id, beta=args.beta, ftx=args.ftx, batch_size=args.batch_size)
    model.eval()
    task.compute_reference(model)
    cfg = TrainConfig(out_dir=str(out), lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, warmup_ratio=0.0, seed=args.seed, eval_every=args.eval_every,
                      save_every=args.save_every, max_steps=args.max_steps,
                      gradient_checkpointing=args.gradient_checkpointing, device=args.device)
    print(f"HS-DPO on {len(pairs)} pairs: beta {args.beta}, ftx {args.ftx}, lr {args.lr}, {args.epochs} epochs")
    log, finished = train(model, task, cfg, tokenizer_dir=folder, resume=args.resume, desc="HS-DPO")
    if not finished or not distributed.is_main():
        return
    if distributed.active():  # the trained weights are sharded over the ranks; the saved model is whole
        model = load_model(out, device=args.device)
    print("\nreward accuracy / margin on the mined pairs during training:")
    for row in (r for r in log if "pairs_reward_accuracy" in r):
        print(f"  step {row['step']:4d}: accuracy {row['pairs_reward_accuracy']:.3f}, margin {row['pairs_margin']:+.4f}")
    after = report(model, tok, dev, out, args)
    if before and after:
        print("dev split        parse rate  " + "  ".join(f"{t:>10}" for t in before["accuracy"]))
        for name, m in (("R-SFT", before), ("HS-DPO", after)):
            print(f"{name:16} {m['parse_rate']:10.1%}  " + "  ".join(f"{a:10.1%}" for a in m["accuracy"].values()))
    print(f"HS-DPO finished in {(time.time() - started) / 60:.1f} min; model in {out}")
    print(f'try it: python infer.py --model {out} "How do I kill a Python process?"')


if __name__ == "__main__":
    with user_errors():
        main()
