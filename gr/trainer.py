"""The one training loop that R-SFT (paper section 4) and HS-DPO (section 6) share.

AdamW, a cosine schedule with linear warmup, gradient accumulation, gradient clipping, bf16 autocast on
CUDA (fp32 elsewhere), optional gradient checkpointing, batches of similar lengths, a dev evaluation at
intervals, a JSON-lines log and a loss-curve PNG, Hugging Face checkpoints written atomically, and
`resume` that restores model, optimizer, schedule, RNG and data position.

What differs between the two stages is a *task* object:
    lengths                       token length of each training item (for length-grouped batches)
    count(indices) -> int         what a step's loss is averaged over (output tokens, or pairs)
    loss(model, indices, total)   -> (loss of these items divided by `total`, metrics dict, tokens seen)
    evaluate(model) -> dict       dev figures, e.g. {"dev_loss": ...}
Averaging over the whole step's count, not per micro-batch, makes accumulation exact: k micro-batches
give the same gradient as one batch k times larger. The same holds for ranks under torchrun: the calls
into gr.distributed (prepare, share, sum_over_ranks, full_model, ...) are all it takes; each is the
identity in a single process.
"""

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from gr import distributed
from gr.checkpoint import replace_dir, write_model
from gr.data import IGNORE, collate, length_grouped_batches
from gr.losses import dpo_loss, output_positions, sequence_logps, sft_loss
from gr.plot import plot_curves


@dataclass
class TrainConfig:
    out_dir: str
    lr: float = 5e-5
    epochs: int = 3
    batch_size: int = 4  # items per micro-batch (under torchrun: over all ranks, each takes its share)
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0  # steps between dev evaluations (0: at the end only)
    save_every: int = 0  # steps between resume checkpoints (0: at the end only)
    max_steps: int = 0  # stop (resumably) after this many steps; 0 trains all epochs
    gradient_checkpointing: bool = False
    device: str = "cpu"


class SFTTask:
    """R-SFT: tokenized examples (prompt masked); the loss is the NLL of output tokens."""

    def __init__(self, examples, dev_examples, pad_id: int, eval_batch_size: int = 8):
        self.examples, self.dev, self.pad_id, self.eval_batch_size = examples, dev_examples, pad_id, eval_batch_size
        self.lengths = [len(e.input_ids) for e in examples]
        # Output tokens per example, counted once: every step asks for them.
        self.targets = [sum(label != IGNORE for label in e.labels[1:]) for e in examples]

    def count(self, indices) -> int:
        return sum(self.targets[i] for i in indices)

    def loss(self, model, indices, total):
        device = next(model.parameters()).device
        batch = collate([self.examples[i] for i in indices], self.pad_id)
        labels = batch["labels"].to(device)
        logits = model(batch["input_ids"].to(device), logits_at=output_positions(labels))
        tokens = sum(self.lengths[i] for i in indices)
        return sft_loss(logits, labels, num_tokens=total), {}, tokens

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        if not self.dev:
            return {}
        device = next(model.parameters()).device
        nll, count = 0.0, 0
        for start in range(0, len(self.dev), self.eval_batch_size):
            batch = collate(self.dev[start:start + self.eval_batch_size], self.pad_id)
            labels = batch["labels"].to(device)
            n = int((labels[:, 1:] != IGNORE).sum())
            logits = model(batch["input_ids"].to(device), logits_at=output_positions(labels))
            nll += sft_loss(logits, labels).item() * n
            count += n
        return {"dev_loss": nll / count}


class DPOTask:
    """HS-DPO: preference pairs (chosen, rejected Examples, hardness weight) against a frozen reference.

    The reference model's log-probabilities are computed once, before training, by `compute_reference`
    (the R-SFT model is the policy's starting point, so no second model is held during training).
    Chosen and rejected outputs of a micro-batch go through the policy in one concatenated forward.
    """

    def __init__(self, pairs, pad_id: int, beta: float, ftx: float, eval_pairs: int = 256, batch_size: int = 8):
        self.pairs, self.pad_id, self.beta, self.ftx = pairs, pad_id, beta, ftx
        self.eval_pairs, self.batch_size = eval_pairs, batch_size
        self.lengths = [max(len(p["chosen"].input_ids), len(p["rejected"].input_ids)) for p in pairs]
        self.ref = torch.zeros(len(pairs), 2)

    def count(self, indices) -> int:
        return len(indices)

    def _logps(self, model, indices):
        device = next(model.parameters()).device
        batch = collate([self.pairs[i]["chosen"] for i in indices] + [self.pairs[i]["rejected"] for i in indices], self.pad_id)
        labels = batch["labels"].to(device)
        logps, lengths = sequence_logps(model(batch["input_ids"].to(device), logits_at=output_positions(labels)), labels)
        n = len(indices)
        return logps[:n], logps[n:], lengths[:n]

    @torch.no_grad()
    def compute_reference(self, model) -> None:
        """log ref(y_w|x), log ref(y_l|x) of every pair, from the model before any update.

        Under torchrun each rank computes every world-th batch (the same batches as a single process) and
        the ranks sum their tables, in which each row was filled by one rank and is zero elsewhere.
        """
        starts = distributed.share(range(0, len(self.pairs), self.batch_size))
        with autocast_for(next(model.parameters()).device):
            for start in tqdm(starts, desc="reference log-probs", disable=not distributed.is_main()):
                indices = list(range(start, min(start + self.batch_size, len(self.pairs))))
                chosen, rejected, _ = self._logps(model, indices)
                self.ref[indices] = torch.stack([chosen, rejected], 1).float().cpu()
        self.ref = distributed.all_sum(self.ref)

    def loss(self, model, indices, total):
        chosen, rejected, lengths = self._logps(model, indices)
        ref = self.ref[indices].to(chosen.device)
        weights = torch.tensor([self.pairs[i]["weight"] for i in indices], device=chosen.device)
        loss, metrics = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=self.beta, weights=weights,
                                 ftx=self.ftx, chosen_lengths=lengths)
        tokens = sum(len(self.pairs[i]["chosen"].input_ids) + len(self.pairs[i]["rejected"].input_ids) for i in indices)
        return loss * len(indices) / total, metrics, tokens

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Reward accuracy and margin on (up to `eval_pairs` of) the mined pairs."""
        indices = list(range(min(self.eval_pairs, len(self.pairs))))
        margins = []
        for start in range(0, len(indices), self.batch_size):
            part = indices[start:start + self.batch_size]
            chosen, rejected, _ = self._logps(model, part)
            ref = self.ref[part].to(chosen.device)
            margins.append(self.beta * ((chosen - ref[:, 0]) - (rejected - ref[:, 1])).float().cpu())
        margins = torch.cat(margins)
        return {"pairs_reward_accuracy": (margins > 0).float().mean().item(), "pairs_margin": margins.mean().item()}


def autocast_for(device):
    """bf16 autocast on CUDA (weights stay fp32 for the optimizer); plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()


def add_training_args(p, items: str) -> None:
    """The flags R-SFT and HS-DPO share; left unset, they take the script's preset values."""
    p.add_argument("--preset", default="default", help="settings to start from (default: the small CPU run; paper: the authors')")
    p.add_argument("--out", help="output folder")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--epochs", type=int, help=f"passes over the {items}")
    p.add_argument("--batch-size", type=int, help=f"{items} per micro-batch (under torchrun: over all ranks together)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--cutoff", type=int, help="longest prompt + output in tokens; longer ones are cut (and counted)")
    p.add_argument("--template", choices=["raw", "llama3"], help="prompt format (the paper trained with llama3)")
    p.add_argument("--device", help="cpu or cuda (default: cpu; cuda for --preset paper)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute activations in backward to save memory")
    p.add_argument("--save-every", type=int, default=0, help="steps between resume checkpoints (0: at the end)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (continue later with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization, sampling and data order")
    p.add_argument("--report-max-new-tokens", type=int, help="tokens generated per dev input in the report")
    p.add_argument("--no-report", action="store_true", help="skip the generation report on the dev split")


def apply_preset(args, presets: dict) -> None:
    """Fill every flag the user left unset from the chosen preset; check that its device exists."""
    from gr import GRError

    if args.preset not in presets:
        raise GRError(f"unknown preset '{args.preset}': choose from {', '.join(presets)}")
    for key, value in presets[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GRError("CUDA is not available here: pass --device cpu (or run on a GPU machine)")


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(model, task, cfg: TrainConfig, tokenizer_dir=None, resume: bool = False, desc: str = "train") -> tuple[list[dict], bool]:
    """Train `model` on `task`; write the final model, train_log.jsonl and loss.png to cfg.out_dir.

    A resume checkpoint (model + trainer_state.pt) is kept in out_dir/checkpoint while training runs and
    removed once the final model is written. Returns the log rows and whether training finished (False
    when it stopped at cfg.max_steps, resumable). Under torchrun `model` is sharded in place and every
    rank gets the same log; rank 0 writes the files.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    model = distributed.prepare(model, cfg.device)
    model.train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(length_grouped_batches(task.lengths, cfg.batch_size, cfg.seed)) / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, total, warmup))
    log_path = out / "train_log.jsonl"
    step, log = 0, []
    if resume:
        step, log = _load_checkpoint(ckpt, model, optimizer, scheduler, cfg)
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
    if distributed.is_main():
        log_path.write_text("".join(json.dumps(row) + "\n" for row in log))
    autocast = autocast_for(cfg.device)

    epoch_batches = {}
    bar = tqdm(total=total, initial=step, desc=desc, dynamic_ncols=True, disable=not distributed.is_main())
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: length_grouped_batches(task.lengths, cfg.batch_size, cfg.seed + epoch)}
        micro = epoch_batches[epoch][k * cfg.grad_accum:(k + 1) * cfg.grad_accum]
        started = time.perf_counter()
        count = sum(task.count(b) for b in micro)
        loss_sum, tokens, metrics = 0.0, 0, {}
        for indices in micro:
            mine = distributed.share(indices)  # this rank's items: all of them in a single process
            with autocast:
                # A rank left without items (a micro-batch smaller than the number of ranks) runs one
                # with zero weight, so that its FSDP collectives stay in step with the other ranks'.
                loss, m, n = task.loss(model, mine or indices[:1], count)
            if not mine:
                loss, n = loss * 0, 0
            loss.backward()
            loss_sum += loss.item()
            tokens += n
            part = task.count(mine)
            for key, value in m.items():  # metrics are per micro-batch means; weight them by its share
                metrics[key] = metrics.get(key, 0.0) + value * part / count
        loss_sum, tokens, *values = distributed.sum_over_ranks(loss_sum, tokens, *metrics.values())
        metrics = dict(zip(metrics, values))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - started
        row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss_sum, "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": round(tokens / seconds, 1), **metrics}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
            model.eval()
            with autocast:
                row.update(task.evaluate(model))
            model.train()
        log.append(row)
        if distributed.is_main():
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        stop = cfg.max_steps and step >= cfg.max_steps and step < total
        if stop or (cfg.save_every and step % cfg.save_every == 0 and step < total):
            _save_checkpoint(ckpt, model, optimizer, scheduler, step, log, cfg, tokenizer_dir)
        if stop:
            bar.close()
            print(f"stopped after step {step} of {total}; continue with --resume")
            return log, False
    bar.close()
    model.eval()
    whole = distributed.full_model(model)  # `model` itself in a single process
    if distributed.is_main():
        whole.save_pretrained(out, tokenizer_dir=tokenizer_dir)
        shutil.rmtree(ckpt, ignore_errors=True)
        plot_loss(log, out / "loss.png")
    distributed.barrier()  # the files are written when train() returns, on every rank
    return log, True


def plot_loss(log: list[dict], path) -> None:
    series = {"train": ([r["step"] for r in log], [r["loss"] for r in log])}
    dev = [r for r in log if "dev_loss" in r]
    if dev:
        series["dev"] = ([r["step"] for r in dev], [r["dev_loss"] for r in dev])
    plot_curves(path, series)


def _save_checkpoint(ckpt: Path, model, optimizer, scheduler, step, log, cfg, tokenizer_dir) -> None:
    # Under torchrun every rank sends its shards; rank 0 writes the whole model and optimizer state, in
    # the single-process format, so that any number of ranks can resume.
    whole, optimizer_state = distributed.full_model(model), distributed.full_optimizer_state(model, optimizer)
    if distributed.is_main():
        tmp = ckpt.with_name(f".{ckpt.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_model(whole, tmp, tokenizer_dir)
        state = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                 "rng": _rng_state(), "log": log, "config": asdict(cfg)}
        torch.save(state, tmp / "trainer_state.pt")
        replace_dir(tmp, ckpt)
    distributed.barrier()


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler, cfg):
    from gr import GRError
    from gr.checkpoint import load_model
    from gr.model import Transformer

    if not (ckpt / "trainer_state.pt").exists():
        raise GRError(f"nothing to resume: {ckpt} holds no checkpoint (start without --resume)")
    # Onto the CPU (optimizer.load_state_dict moves the state to the parameters), so that under torchrun a
    # state saved on one GPU does not land on every rank's GPU 0; there every rank reads the file but only
    # rank 0 uses the optimizer state, so it is mapped rather than read.
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=distributed.active())
    saved = {k: v for k, v in state["config"].items() if k not in ("max_steps", "save_every", "eval_every", "device")}
    now = {k: v for k, v in asdict(cfg).items() if k in saved}
    if saved != now:
        changed = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in saved if saved[k] != now[k])
        raise GRError(f"the run in {ckpt.parent} was started with other settings ({changed}); resume with the same ones")
    weights = {}
    if distributed.is_main():  # under torchrun rank 0 reads the weights and sends the other ranks their shards
        weights = load_model(Transformer, ckpt, dtype=next(model.parameters()).dtype, device=cfg.device).state_dict()
    distributed.load_full_state(model, optimizer, weights, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["log"]
