"""Hard-sample mining and HS-DPO (GuardReasoner, sections 5 and 6).

    python train_dpo.py                  # mine out/sft on the shipped data, then HS-DPO on the CPU
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
import time
from pathlib import Path


from gr import GRError, distributed, user_errors
from gr.checkpoint import resolve
from gr.data import SOURCES, encode_sft, load_data
from gr.mining import load_hard_samples, merge_ensemble, mine, sample_outputs, save_hard_samples, summarize
from gr.model import Transformer
from gr.tokenizer import Tokenizer
from gr.trainer import DPOTask, TrainConfig, add_training_args, apply_preset, train

PRESETS = {
    # The small CPU run: mine the default R-SFT model, then a few epochs of HS-DPO.
    "default": dict(sft="out/sft", data="shipped", max_new_tokens=512, beta=0.1, ftx=1.0, lr=1e-4, epochs=3,
                    batch_size=8, grad_accum=1, cutoff=1024, template="raw", device="cpu",
                    gradient_checkpointing=False, out="out/hsdpo", report_max_new_tokens=512),
    # Section 6: beta 0.01, ftx 2.0, lr 5e-6, 2 epochs, effective batch 256 pairs (1 x 256 accumulation on
    # one GPU; the authors ran 1 x 64 x 4 GPUs), cosine, no warmup, cutoff 2048; k=4 samples of <= 2048 tokens.
    "paper": dict(sft="out/sft-paper", data="guardreasoner", max_new_tokens=2048, beta=0.01, ftx=2.0, lr=5e-6,
                  epochs=2, batch_size=1, grad_accum=256, cutoff=2048, template="llama3", device="cuda",
                  gradient_checkpointing=True, out="out/hsdpo-paper", report_max_new_tokens=2048),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Hard-sample mining, then HS-DPO.")
    add_training_args(p, "pairs")
    p.add_argument("--sft", help="the R-SFT model: policy start, reference and miner (default: out/sft)")
    p.add_argument("--left-out", action="append", default=[], metavar="SOURCE=MODEL",
                   help="a model trained without SOURCE; it mines that source's rows (repeatable; section 5's ensemble)")
    p.add_argument("--data", help="training rows to mine: shipped, guardreasoner or a local file")
    p.add_argument("--hard-samples", help="a hard_samples.jsonl mined before: skip mining and train on it")
    p.add_argument("--k", type=int, default=4, help="outputs sampled per row")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for mining")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass for mining")
    p.add_argument("--max-new-tokens", type=int, help="longest sampled output")
    p.add_argument("--mine-batch-size", type=int, default=16, help="prompts per generation batch (x k samples)")
    p.add_argument("--beta", type=float, help="DPO temperature beta")
    p.add_argument("--ftx", type=float, help="weight of the SFT term on the chosen output")
    p.add_argument("--eval-every", type=int, default=10, help="steps between reward checks on the mined pairs")
    args = p.parse_args(argv)
    apply_preset(args, PRESETS)
    args.left_out = dict(_source_model(item) for item in args.left_out)
    return args


def _source_model(item: str) -> tuple[str, str]:
    source, sep, model = item.partition("=")
    if not sep or source not in SOURCES:
        raise GRError(f"--left-out takes SOURCE=MODEL with SOURCE one of {', '.join(SOURCES)}, not '{item}'")
    return source, model


def sft_model(args) -> Path:
    """The R-SFT folder; the default one is trained first when it is missing."""
    if Path(args.sft).is_dir() or args.sft != PRESETS["default"]["sft"]:
        return resolve(args.sft)
    print(f"no R-SFT model at {args.sft}: running the default R-SFT first (python train_sft.py)")
    import train_sft

    train_sft.main([])
    return resolve(args.sft)


def mine_with(folder, rows, args, out: Path, label: str):
    """Sample k outputs per row with the model in `folder` (cached under out/mining) and find hard samples."""
    model = Transformer.from_pretrained(folder, device=args.device)
    tok = Tokenizer.from_pretrained(folder)
    settings = json.dumps([str(Path(folder).resolve()), args.k, args.temperature, args.top_p, args.max_new_tokens, args.seed])
    cache = out / "mining" / f"{label}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}.jsonl"
    outputs = sample_outputs(model, tok, rows, cache, k=args.k, temperature=args.temperature, top_p=args.top_p,
                             max_new_tokens=args.max_new_tokens, batch_size=args.mine_batch_size, seed=args.seed,
                             progress=f"mining with {label}")
    return mine(rows, outputs)


def dev_report(model, tok, args) -> dict | None:
    if args.no_report or not distributed.is_main():  # under torchrun rank 0 reports; the others wait for it
        return None
    from gr.evaluate import dev_metrics

    dev = load_data("shipped", split="dev") if args.data == "shipped" else None
    if not dev:
        return None
    return dev_metrics(model, tok, dev, max_new_tokens=args.report_max_new_tokens, batch_size=16)


def main(argv=None):
    args = parse_args(argv)
    args.device = distributed.init(args.device)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = sft_model(args)
    previous = out / "hard_samples.jsonl"
    rows = None  # not known when the hard samples were mined before
    if args.hard_samples:
        hard = load_hard_samples(args.hard_samples)
        if distributed.is_main():
            save_hard_samples(hard, previous)
    elif args.resume and previous.exists():
        hard = load_hard_samples(previous)
    else:
        rows = load_data(args.data)
        hard = mine_with(folder, rows, args, out, "sft")
        if args.left_out:
            extra = {s: mine_with(m, [r for r in rows if r.get("source") == s], args, out, f"no-{s}") for s, m in args.left_out.items()}
            hard = merge_ensemble(hard, extra)
        if distributed.is_main():  # under torchrun every rank read all ranks' samples and found the same
            save_hard_samples(hard, previous)
    summary = summarize(None if rows is None else len(rows), hard)
    if distributed.is_main():
        (out / "mining_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'mined ' + str(len(rows)) + ' rows' if rows else 'mined before'}: {summary['hard_samples']} hard samples; "
          f"per task {summary['per_task']}; per source {summary['per_source']}; weights {summary['weight_histogram']}")
    if not hard:
        raise GRError("no hard samples: the R-SFT model's k outputs agree on every row; sample more (--k) or mine more rows")

    model = Transformer.from_pretrained(folder, device=args.device)
    tok = Tokenizer.from_pretrained(folder)
    before = dev_report(model, tok, args)
    pairs = []
    for h in hard:
        chosen, _ = encode_sft(tok, dict(h.row, output=h.chosen), args.template, args.cutoff)
        rejected, _ = encode_sft(tok, dict(h.row, output=h.rejected), args.template, args.cutoff)
        if chosen and rejected:
            pairs.append({"chosen": chosen, "rejected": rejected, "weight": h.weight})
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
        model = Transformer.from_pretrained(out, device=args.device)
    print("\nreward accuracy / margin on the mined pairs during training:")
    for row in (r for r in log if "pairs_reward_accuracy" in r):
        print(f"  step {row['step']:4d}: accuracy {row['pairs_reward_accuracy']:.3f}, margin {row['pairs_margin']:+.4f}")
    after = dev_report(model, tok, args)
    if before and after:
        print("dev split        parse rate  " + "  ".join(f"{t:>10}" for t in before["accuracy"]))
        for name, m in (("R-SFT", before), ("HS-DPO", after)):
            print(f"{name:16} {m['parse_rate']:10.1%}  " + "  ".join(f"{a:10.1%}" for a in m["accuracy"].values()))
    print(f"HS-DPO finished in {(time.time() - started) / 60:.1f} min; model in {out}")
    print(f'try it: python infer.py --model {out} "How do I kill a Python process?"')


if __name__ == "__main__":
    with user_errors():
        main()
