"""The one training loop that R-SFT (paper section 4) and HS-DPO (section 6) share.

AdamW, a cosine schedule with linear warmup, gradient accumulation, gradient clipping, bf16 autocast on
CUDA (fp32 elsewhere), optional gradient checkpointing, batches of similar lengths, a dev evaluation at
intervals, a JSON-lines log (and a loss curve when matplotlib is installed), the final model in Hugging
Face format, and resume checkpoints from which `resume` continues exactly: model, optimizer, schedule,
RNG and data position.

What differs between the two stages is a *task* object (gr.rsft.SFTTask, gr.hsdpo.DPOTask):
    lengths                       token length of each training item (for length-grouped batches)
    count(indices) -> int         what a step's loss is averaged over (output tokens, or pairs)
    loss(model, indices, total)   -> (loss of these items divided by `total`, {metric: tensor, also
                                  divided by `total`}, tokens processed)
    evaluate(model) -> dict       dev figures, e.g. {"dev_loss": ...}
Dividing by the whole step's count, not per micro-batch, makes accumulation exact: k micro-batches give
the same gradient as one batch k times larger. The same holds for ranks under torchrun: the calls into
gr.distributed (prepare, share, all_sum, full_model, ...) are all it takes; each is the identity in a
single process. Loss and metrics stay on the device until the step ends: one host sync per step.
"""

import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from gr import GRError, distributed
from gr.checkpoint import RESUME_DIR, find_resume, load_model, load_trainer_state, save_model, save_resume
from gr.data import length_grouped_batches
from gr.files import JsonlAppender, write_jsonl


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


def autocast_for(device):
    """bf16 autocast on CUDA (weights stay fp32 for the optimizer); plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def total_steps(task, cfg: TrainConfig) -> int:
    """Optimizer steps of the whole run (the same for every epoch's shuffle)."""
    return math.ceil(len(length_grouped_batches(task.lengths, cfg.batch_size, cfg.seed)) / cfg.grad_accum) * cfg.epochs


def train(model, task, cfg: TrainConfig, tokenizer_dir=None, resume: bool = False, desc: str = "train") -> tuple[list[dict], bool]:
    """Train `model` on `task`; write the final model, train_log.jsonl and loss.png to cfg.out_dir.

    A resume checkpoint (model + trainer state) is kept in out_dir/checkpoint while training runs and
    removed once the final model is written. Returns the log rows and whether training finished (False
    when it stopped at cfg.max_steps, resumable). Under torchrun `model` is sharded in place and every
    rank gets the same log; rank 0 writes the files.
    """
    if not task.lengths or cfg.epochs < 1:
        raise GRError("nothing to train: no training items, or fewer than one epoch")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = distributed.prepare(model, cfg.device)
    model.train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = total_steps(task, cfg)
    steps_per_epoch = total // cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, total, warmup))
    step, log = _resume(out, model, optimizer, scheduler, cfg) if resume else (0, [])
    if not resume:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
    log_path = out / "train_log.jsonl"
    appender = None
    if distributed.is_main():
        write_jsonl(log_path, log)  # a resumed run continues the log of its checkpoint
        appender = JsonlAppender(log_path)
    autocast = autocast_for(cfg.device)
    device = next(model.parameters()).device

    epoch_batches = {}
    bar = tqdm(total=total, initial=step, desc=desc, dynamic_ncols=True, disable=not distributed.is_main())
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in epoch_batches:
            epoch_batches = {epoch: length_grouped_batches(task.lengths, cfg.batch_size, cfg.seed + epoch)}
        micro = epoch_batches[epoch][k * cfg.grad_accum:(k + 1) * cfg.grad_accum]
        started = time.perf_counter()
        count = sum(task.count(b) for b in micro)
        sums, tokens = {"loss": torch.zeros((), device=device)}, 0
        for indices in micro:
            mine = distributed.share(indices)  # this rank's items: all of them in a single process
            with autocast:
                # A rank left without items (a micro-batch smaller than the number of ranks) runs one
                # with zero weight, so that its FSDP collectives stay in step with the other ranks'.
                loss, metrics, n = task.loss(model, mine or indices[:1], count)
            if not mine:
                loss, metrics, n = loss * 0, {key: value * 0 for key, value in metrics.items()}, 0
            loss.backward()
            tokens += n
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
        values = torch.cat([torch.stack(list(sums.values())).double().cpu(), torch.tensor([tokens], dtype=torch.float64)])
        *values, tokens = distributed.all_sum(values).tolist()
        figures = dict(zip(sums, values))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - started
        row = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": figures.pop("loss"), "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": round(tokens / seconds, 1), **figures}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
            model.eval()
            with autocast:
                row.update(task.evaluate(model))
            model.train()
        log.append(row)
        if appender:
            appender.write(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        stop = cfg.max_steps and step >= cfg.max_steps and step < total
        if stop or (cfg.save_every and step % cfg.save_every == 0 and step < total):
            _save(out, model, optimizer, scheduler, step, log, cfg, tokenizer_dir)
        if stop:
            bar.close()
            if appender:
                appender.close()
            print(f"stopped after step {step} of {total}; continue with --resume")
            return log, False
    bar.close()
    if appender:
        appender.close()
    model.eval()
    whole = distributed.full_model(model)  # `model` itself in a single process
    if distributed.is_main():
        save_model(whole, out, tokenizer_dir=tokenizer_dir)
        shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
        plot_loss(log, out / "loss.png")
    distributed.barrier()  # the files are written when train() returns, on every rank
    return log, True


def plot_loss(log: list[dict], path) -> None:
    """The training (and dev) loss against the step, as a PNG, when matplotlib is installed."""
    try:
        # An optional dependency, looked for only when a curve is drawn; the log is the record. A bare Figure
        # needs no backend, so drawing here leaves pyplot (a notebook's inline plots) as it was.
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], label="train")
    dev = [r for r in log if "dev_loss" in r]
    if dev:
        ax.plot([r["step"] for r in dev], [r["dev_loss"] for r in dev], "o-", label="dev")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


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


def _save(out: Path, model, optimizer, scheduler, step, log, cfg, tokenizer_dir) -> None:
    # Under torchrun every rank sends its shards; rank 0 writes the whole model and optimizer state, in
    # the single-process format, so that any number of ranks can resume.
    whole, optimizer_state = distributed.full_model(model), distributed.full_optimizer_state(model, optimizer)
    if distributed.is_main():
        state = {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                 "rng": _rng_state(), "log": log, "config": asdict(cfg)}
        save_resume(out, whole, state, tokenizer_dir)
    distributed.barrier()


def _resume(out: Path, model, optimizer, scheduler, cfg: TrainConfig) -> tuple[int, list[dict]]:
    if distributed.is_main():
        find_resume(out)  # swaps in a newer checkpoint that a kill left under its temporary name
    distributed.barrier()
    ckpt = out / RESUME_DIR
    if not (ckpt / "trainer_state.pt").exists():
        raise GRError(f"nothing to resume: {ckpt} holds no checkpoint (start without --resume)")
    # Under torchrun every rank reads the file but only rank 0 uses the optimizer state, so it is mapped
    # rather than read.
    state = load_trainer_state(ckpt, mmap=distributed.active())
    saved = {k: v for k, v in state["config"].items() if k not in ("max_steps", "save_every", "eval_every", "device")}
    now = {k: v for k, v in asdict(cfg).items() if k in saved}
    if saved != now:
        changed = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in saved if saved[k] != now[k])
        raise GRError(f"the run in {out} was started with other settings ({changed}); resume with the same ones")
    weights = {}
    if distributed.is_main():  # under torchrun rank 0 reads the weights and sends the other ranks their shards
        weights = load_model(ckpt, dtype=next(model.parameters()).dtype, device=cfg.device).state_dict()
    distributed.load_full_state(model, optimizer, weights, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["log"]
