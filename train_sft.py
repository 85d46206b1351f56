"""R-SFT: reasoning supervised fine-tuning (GuardReasoner, section 4).

    python train_sft.py                      # the embedded default: a small LLaMA from scratch, CPU, minutes
    python train_sft.py --preset small       # SmolLM2-135M-Instruct on the shipped data: a small guard, CPU
    python train_sft.py --preset paper       # the authors' recipe: Llama-3.2-1B on GuardReasonerTrain, GPU
    torchrun --nproc_per_node=4 train_sft.py --preset paper --batch-size 24 --grad-accum 16   # 4 GPUs, FSDP2

The default trains a byte-level BPE tokenizer and a 4-layer LLaMA on the dataset shipped in data/, then
prints the dev loss, how many dev outputs end in a full Answers block, and the dev accuracy per task.
`--no-reasoning` trains on the Answers block alone (the paper's baseline without reasoning); `--dual-mode
SHARE` adds that share of the rows again as fast rows (the fast instruction, the Answers block alone), so
one model gives reasoned verdicts and fast ones (gr.guard).
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch

from gr import GRError, distributed, user_errors
from gr.checkpoint import GUARD_FILE, find_resume, load_model, load_tokenizer, resolve
from gr.cli import add_training_args, apply_preset
from gr.data import SOURCES, encode_rows, load_data
from gr.files import write_text
from gr.evaluate import dev_report
from gr.guard import Guard
from gr.model import ModelConfig, Transformer
from gr.prompts import FAST_INSTRUCTION, format_answers, parse_answers, split_input
from gr.rsft import SFTTask
from gr.tokenizer import Tokenizer, train_bpe
from gr.trainer import TrainConfig, train

# The embedded default: small enough to train on a 2-core CPU in minutes, big enough to learn the format.
SCRATCH_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0)
SCRATCH_VOCAB = 2048
SMALL_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

PRESETS = {
    # From scratch on the shipped data (or fine-tuning --model with a fine-tuning learning rate).
    "default": dict(data="shipped", lr=None, epochs=2, batch_size=8, grad_accum=1, warmup_ratio=0.05, cutoff=1024,
                    template="raw", device="cpu", gradient_checkpointing=False, out="out/sft", save_every=0,
                    report_max_new_tokens=512),
    # A small real guard on a CPU: SmolLM2-135M-Instruct fine-tuned on the shipped data (settings chosen on dev).
    "small": dict(model=SMALL_MODEL, data="shipped", lr=3e-4, epochs=1, batch_size=4, grad_accum=4,
                  warmup_ratio=0.03, cutoff=1024, template="raw", device="cpu", gradient_checkpointing=False,
                  out="out/sft-small", save_every=20, report_max_new_tokens=512),
    # Section 4: lr 5e-5, 3 epochs, effective batch 384 (6 x 64 accumulation on one GPU; the authors ran
    # 6 x 16 x 4 GPUs), cosine, no warmup, cutoff 2048, the llama3 chat template.
    "paper": dict(model="meta-llama/Llama-3.2-1B", data="guardreasoner", lr=5e-5, epochs=3, batch_size=6,
                  grad_accum=64, warmup_ratio=0.0, cutoff=2048, template="llama3", device="cuda",
                  gradient_checkpointing=True, out="out/sft-paper", save_every=100, report_max_new_tokens=2048),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="R-SFT: train a guard model to reason, then answer. "
                                            f"Presets: {', '.join(PRESETS)}.")
    add_training_args(p, "sequences")
    p.add_argument("--model", help="pretrained checkpoint folder or hub id to fine-tune (default: a small model from scratch)")
    p.add_argument("--data", help="shipped, guardreasoner (hub, optionally guardreasoner:Split1,Split2) or a local .json/.jsonl/folder")
    p.add_argument("--exclude-source", choices=SOURCES, help="leave one seed source out (section 5's diversity models)")
    p.add_argument("--no-reasoning", action="store_true", help="learn the Answers block alone (the paper's baseline without reasoning)")
    p.add_argument("--dual-mode", type=float, default=0.0, metavar="SHARE",
                   help="also learn fast verdicts: this share of the rows again, with the fast instruction and "
                        "the Answers block alone (0: reasoning only)")
    p.add_argument("--warmup-ratio", type=float, help="share of steps with linear warmup")
    p.add_argument("--dev-size", type=int, default=200, help="rows held out as dev split when the data has none")
    p.add_argument("--eval-every", type=int, default=0, help="steps between dev-loss evaluations (0: at the end)")
    args = p.parse_args(argv)
    if args.exclude_source and args.out is None:
        args.out = f"{PRESETS.get(args.preset, PRESETS['default'])['out']}-no-{args.exclude_source}"
    if args.no_reasoning and args.out is None:
        args.out = f"{PRESETS.get(args.preset, PRESETS['default'])['out']}-no-reasoning"
    apply_preset(args, PRESETS)
    if not 0 <= args.dual_mode <= 1 or (args.dual_mode and args.no_reasoning):
        raise GRError("--dual-mode takes a share between 0 and 1, and does not go with --no-reasoning")
    if args.lr is None:  # from scratch, or fine-tuning --model
        args.lr = 5e-5 if args.model else 2e-3
    return args


def answers_only(row: dict, instruction: str | None = None) -> dict:
    """The row with its output cut to the Answers block (and another instruction, when given): what the
    model learns without reasoning."""
    a = parse_answers(row["output"])
    return dict(row, output=format_answers(a.request, a.completion, a.response),
                instruction=instruction or row["instruction"])


def split_data(args) -> tuple[list[dict], list[dict]]:
    rows = load_data(args.data)
    if args.data == "shipped":
        dev = load_data("shipped", split="dev")
    else:
        random.Random(args.seed).shuffle(rows)
        n_dev = min(args.dev_size, len(rows) // 5)
        dev, rows = rows[:n_dev], rows[n_dev:]
    if args.exclude_source:
        kept = [r for r in rows if r.get("source") != args.exclude_source]
        if len(kept) == len(rows):
            raise GRError(f"no training rows come from source '{args.exclude_source}' in {args.data}")
        rows = kept
    if args.no_reasoning:
        rows, dev = [answers_only(r) for r in rows], [answers_only(r) for r in dev]
    if args.dual_mode:
        fast = random.Random(args.seed).sample(rows, round(args.dual_mode * len(rows)))
        rows = rows + [answers_only(r, FAST_INSTRUCTION) for r in fast]
    return rows, dev


def build_model(args, rows, out: Path):
    """The model to train, its tokenizer and the folder its tokenizer files come from."""
    if args.model:
        folder = resolve(args.model)
        return load_model(folder, dtype=torch.float32, device=args.device), load_tokenizer(folder), folder
    if not args.resume and distributed.is_main():
        train_bpe((r["instruction"] + "\n" + r["input"] + r["output"] for r in rows), SCRATCH_VOCAB, out)
    distributed.barrier()  # under torchrun the other ranks read the tokenizer rank 0 wrote
    tok = Tokenizer.from_folder(out)
    cfg = ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.stop_ids,
                      pad_token_id=tok.pad_id, **SCRATCH_MODEL)
    model = Transformer(cfg)
    model.init_weights(seed=args.seed)
    return model.to(args.device), tok, out


def report(model, tok, dev, log, args, seconds):
    first = log[0]["loss"]
    print(f"\nR-SFT finished in {seconds / 60:.1f} min: {len(log)} steps, first logged loss {first:.4f}, "
          f"dev loss {log[-1].get('dev_loss', float('nan')):.4f}")
    if args.no_report or not dev:
        return
    guard = Guard(model, tok, max_new_tokens=args.report_max_new_tokens)
    m = dev_report(guard, dev, args.out)
    print(f"dev outputs with a full Answers block: {m['parse_rate']:.1%} of {len(dev)}")
    print("dev label accuracy: " + ", ".join(f"{task} {acc:.1%}" for task, acc in m["accuracy"].items()))
    prompt, response = split_input(dev[0]["input"])
    verdict = parse_answers(m["outputs"][0])
    print(f"example: request {prompt!r}" + (f", response {response[:60]!r}..." if response else ""))
    print(f"  verdict: request {verdict.request}, completion {verdict.completion}, response {verdict.response}")
    print(f'try it: python infer.py --model {args.out} "How do I kill a Python process?"')


def main(argv=None):
    args = parse_args(argv)
    args.device = distributed.init(args.device)
    started = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if args.resume and find_resume(out) is None:
        raise GRError(f"nothing to resume: {out}/checkpoint holds no checkpoint (start without --resume)")
    rows, dev = split_data(args)
    if args.model:
        resolve(args.model)  # a missing model is reported before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if args.dual_mode and distributed.is_main():  # the model answers fast after this instruction (gr.guard)
        write_text(out / GUARD_FILE, json.dumps({"fast_instruction": FAST_INSTRUCTION}, indent=2) + "\n")
    model, tok, tokenizer_dir = build_model(args, rows, out)
    examples, cut = encode_rows(tok, rows, args.template, args.cutoff)
    dev_examples, dev_cut = encode_rows(tok, dev, args.template, args.cutoff)
    if not examples:
        raise GRError(f"no training row keeps any output within --cutoff {args.cutoff} tokens: raise --cutoff")
    n_params = sum(p.numel() for p in model.parameters())
    fast_rows = sum(r["instruction"] == FAST_INSTRUCTION for r in rows)
    print(f"R-SFT of {args.model or 'a new model'} ({n_params / 1e6:.1f}M parameters) on {len(examples)} rows of "
          f"{args.data}{f' without {args.exclude_source}' if args.exclude_source else ''}"
          f"{' (Answers blocks only)' if args.no_reasoning else ''}"
          f"{f' ({fast_rows} of them fast rows)' if fast_rows else ''}"
          f", {len(dev_examples)} dev rows; "
          f"{cut + dev_cut} rows longer than {args.cutoff} tokens were cut")
    cfg = TrainConfig(out_dir=str(out), lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio, seed=args.seed,
                      eval_every=args.eval_every, save_every=args.save_every, max_steps=args.max_steps,
                      gradient_checkpointing=args.gradient_checkpointing, device=args.device)
    task = SFTTask(examples, dev_examples, tok.pad_id)
    log, finished = train(model, task, cfg, tokenizer_dir=tokenizer_dir, resume=args.resume, desc="R-SFT")
    if not finished or not distributed.is_main():
        return
    if distributed.active():  # the trained weights are sharded over the ranks; the saved model is whole
        model = load_model(out, device=args.device)
    report(model, tok, dev, log, args, time.time() - started)


if __name__ == "__main__":
    with user_errors():
        main()
