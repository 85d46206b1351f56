"""Training past one device: `torchrun` starts one process (a rank) per device; this module is the only
code that knows. In a single process (no torchrun, or one rank) every function here is the identity or
does nothing, so the trainer, mining and the scripts read as single-process code with a few named calls.

Under torchrun:
- Data: every rank builds the same micro-batches as a single process would (the data order does not
  depend on the number of ranks) and computes the loss of its share, every world-th item, divided by the
  whole step's count, which every rank knows without communicating. The ranks' gradients are summed,
  not averaged, so they equal the single-process gradient of the whole batch.
- Model: FSDP2 (`fully_shard`) shards parameters, gradients and optimizer state, one unit per
  transformer block and the root (embeddings, final norm, head). On CUDA it computes in bf16 and
  reduces gradients in fp32 (MixedPrecisionPolicy); fp32 on the CPU (gloo), where FSDP2 runs too.
- Checkpoints: gathered whole onto rank 0's CPU and written by rank 0 alone, in the single-process
  format; loading reads them on rank 0, broadcasts and re-shards, so a run resumes on any number of ranks.
- Mining: the ranks sample different chunks of rows (gr.mining.sample_outputs).
- Output: rank 0 prints; the other ranks' stdout goes to /dev/null (their errors, on stderr, still show).
The output folder must be one that every rank sees (one machine, or a shared filesystem).
"""

import atexit
import gc
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from gr import GRError
from gr.model import Transformer

# FSDP2 and torch.distributed.checkpoint are imported where they are used: importing them costs a
# single-process run most of a second for nothing.

# Ranks wait for each other while rank 0 alone writes a checkpoint or generates a report, and while the
# slowest rank finishes its mining chunks: longer than NCCL's default 10 minutes may pass.
TIMEOUT = timedelta(hours=1)


def init(device: str) -> str:
    """Join the torchrun process group, if there is one; return the device this process works on
    (cuda:LOCAL_RANK under torchrun on GPUs). Calling it again is harmless."""
    cuda = torch.device(device).type == "cuda"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if not dist.is_initialized():
        if cuda:
            local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
            if local >= gpus:
                raise GRError(f"torchrun started more processes on this machine than it has GPUs ({gpus}): "
                              f"pass --nproc_per_node={gpus} or fewer")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(_leave)
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")
    return f"cuda:{torch.cuda.current_device()}" if cuda else device


def _leave() -> None:
    """Leave the process group while the interpreter is whole. FSDP2's hooks keep the trained model in
    reference cycles that hold the group's tensors; freed only at interpreter shutdown, they let gloo's
    threads touch Python objects being torn down (an occasional SIGABRT at exit). Collect them first."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def share(items) -> list:
    """This rank's part of `items`: every world-th one, starting at its rank (all of them in a single process)."""
    return list(items)[rank()::world_size()]


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks (NCCL sums on the GPU, so the tensor travels there and back)."""
    if not active():
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    summed = t.to(device)
    dist.all_reduce(summed)
    return summed.to(t.device)


def prepare(model, device):
    """The model to train: moved to `device` in a single process; under torchrun sharded with FSDP2
    (which moves each rank's shards to `device`)."""
    if not active():
        return model.to(device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    kind = torch.device(device).type
    mesh = init_device_mesh(kind, (world_size(),))
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if kind == "cuda" else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Each rank's loss is already its share of the step's mean: sum the gradients, do not
            # average them. (Plain sums are also all that gloo offers.)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def full_model(model):
    """The whole model, for writing: `model` itself in a single process; under torchrun a plain copy on
    rank 0's CPU, gathered from all ranks' shards (None on the other ranks, which must call it too)."""
    if not active():
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(gather=True))
    if not is_main():
        return None
    with torch.device("meta"):
        whole = Transformer(model.config)
    whole.load_state_dict(state, assign=True)
    whole.tie_weights()
    return whole


def full_optimizer_state(model, optimizer) -> dict | None:
    """optimizer.state_dict() as a single process has it (keyed by parameter index); under torchrun
    gathered whole on rank 0 (None on the other ranks, which must call it too)."""
    if not active():
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(gather=True))
    if not is_main():
        return None
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [dict(g, params=[index[name] for name in g["params"]]) for g in state["param_groups"]]}


def load_full_state(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Load whole model weights and a single-process optimizer state. Under torchrun only rank 0's
    arguments are read (the others may pass empty dicts): rank 0 broadcasts, every rank keeps its shards."""
    if not active():
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if is_main():
        names = [name for name, _ in model.named_parameters()]
        optimizer_state = {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
                           "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in optimizer_state["param_groups"]]}
    set_model_state_dict(model, weights, options=_options(gather=False))
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options(gather=False))


def _options(gather: bool):
    """Whole (unsharded) state dicts: gathered onto rank 0's CPU, or broadcast from rank 0 and re-sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if gather:
        return StateDictOptions(full_state_dict=True, cpu_offload=True)
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
