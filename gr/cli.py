"""What the command lines share: the training flags and presets, and every setting checked before any work.

A user's mistake (a zero batch size, an unknown device, an output folder that cannot be written) ends the
program with one line and exit status 2 (gr.user_errors) before a model is loaded or a step is run.
"""

import torch

from gr import GRError
from gr.files import check_out_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str) -> str:
    """cpu, cuda or cuda:N, where it exists; anything else is a user error."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise GRError(f"--device {device} is not supported: use cpu or cuda (cuda:N for one GPU of several)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise GRError(f"--device {device} was asked for but CUDA is not available here: use --device cpu")
    return device


def at_least(value, minimum, flag: str) -> None:
    if value is not None and value < minimum:
        raise GRError(f"{flag} must be at least {minimum}, not {value}")


def add_training_args(p, items: str) -> None:
    """The flags R-SFT and HS-DPO share; left unset, they take the script's preset values."""
    p.add_argument("--preset", default="default", help="settings to start from (the presets are listed in the script's help)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--epochs", type=int, help=f"passes over the {items}")
    p.add_argument("--batch-size", type=int, help=f"{items} per micro-batch (under torchrun: over all ranks together)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--cutoff", type=int, help="longest prompt + output in tokens; longer ones are cut (and counted)")
    p.add_argument("--template", choices=["raw", "llama3"], help="prompt format (the paper trained with llama3)")
    p.add_argument("--device", help="cpu or cuda (default: cpu; cuda for --preset paper)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute activations in backward to save memory")
    p.add_argument("--save-every", type=int, help="steps between resume checkpoints (0: only when stopping)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (continue later with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed for initialization, sampling and data order")
    p.add_argument("--report-max-new-tokens", type=int, help="tokens generated per dev input in the report")
    p.add_argument("--no-report", action="store_true", help="skip the generation report on the dev split")


def apply_preset(args, presets: dict) -> None:
    """Fill every flag the user left unset from the chosen preset, then check all the settings."""
    if args.preset not in presets:
        raise GRError(f"unknown preset '{args.preset}': choose from {', '.join(presets)}")
    for key, value in presets[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    check_training_args(args)


def check_training_args(args) -> None:
    """The settings every training run needs, checked before anything is loaded or trained."""
    if args.lr is not None and not args.lr > 0:
        raise GRError(f"--lr must be above 0, not {args.lr}")
    for flag, minimum in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("cutoff", 16), ("max_steps", 0),
                          ("save_every", 0), ("report_max_new_tokens", 1)):
        at_least(getattr(args, flag, None), minimum, "--" + flag.replace("_", "-"))
    check_device(args.device)
    check_out_dir(args.out)
