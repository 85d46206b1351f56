"""Training and mining on several ranks (torchrun, gloo on the CPU, FSDP2) give what one process gives.

Each test launches the real scripts twice or more, as one process and as `torchrun --standalone
--nproc_per_node=2` (a free port, so parallel test runs do not collide), on a tiny model and dataset.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_guard
from gr.checkpoint import load_model
from gr.model import Transformer
from gr.prompts import format_answers, format_input

# One thread per process: two ranks share this machine's cores, and the single-process runs they are
# compared with should not be slowed down by oversubscription either.
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# 26 rows, 4 held out: 22 training rows in micro-batches of 3 end in a batch of 1, so one rank has no
# item of it and must still keep in step with the other.
SFT = ["--dev-size", "4", "--epochs", "2", "--batch-size", "3", "--grad-accum", "2", "--lr", "1e-3", "--no-report"]


def rows(n: int) -> list[dict]:
    """Rows with a short instruction and only two distinct inputs under random labels: a model trained
    on them learns the answer format but stays unsure of the labels, so its samples disagree."""
    rng = random.Random(0)
    result = []
    for i in range(n):
        labels = [rng.choice(["harmful", "unharmful"]), rng.choice(["refusal", "compliance"]), rng.choice(["harmful", "unharmful"])]
        result.append({"instruction": "Classify.", "input": format_input(f"question {i % 2}", "an answer"),
                       "output": "# Task 1\n\n# Task 2\n\n# Task 3\n\n" + format_answers(*labels), "source": rng.choice(["aegis", "wildguard"])})
    return result


def launch(script: str, args: list[str], ranks: int = 1) -> str:
    """Run a script as one process or under torchrun; return its stdout."""
    if ranks == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", script]
    result = subprocess.run(cmd + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def train_log(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def assert_same_run(a, b) -> None:
    """Same loss curve (within 1e-4 per step) and the same final weights (within float rounding)."""
    log_a, log_b = train_log(a), train_log(b)
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        for key in ("loss", "grad_norm", "lr", "dev_loss", "pairs_reward_accuracy", "pairs_margin"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-4, (ra["step"], key, ra[key], rb[key])
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-5), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    """The base model, the data, and the single-process R-SFT run the others are compared with."""
    tmp = tmp_path_factory.mktemp("sft")
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(26)))
    args = ["--model", str(tiny_guard(tmp / "guard")), "--data", str(data), *SFT]
    launch("train_sft.py", args + ["--out", str(tmp / "one")])
    return args, tmp / "one"


def test_two_ranks_train_as_one_process(sft_setup, tmp_path):
    args, one = sft_setup
    stdout = launch("train_sft.py", args + ["--out", str(tmp_path / "two")], ranks=2)
    assert_same_run(one, tmp_path / "two")
    assert len(train_log(one)) == 8 and "dev_loss" in train_log(one)[-1]
    assert stdout.count("R-SFT of ") == 1 and stdout.count("R-SFT finished") == 1  # rank 0 alone prints
    assert not (tmp_path / "two" / "checkpoint").exists()
    ours = load_model(tmp_path / "two")
    x = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.allclose(ours(x), load_model(one)(x), atol=1e-4)


def test_resume_on_another_number_of_ranks(sft_setup, tmp_path):
    """Stop after 3 of 8 steps on 2 ranks and finish on 1, and the other way round: both end as the
    uninterrupted run. The checkpoints of both at step 3 hold the same whole (unsharded) state."""
    args, one = sft_setup
    stopped = {}
    for first, then in ((2, 1), (1, 2)):
        out = tmp_path / f"{first}to{then}"
        launch("train_sft.py", args + ["--out", str(out), "--max-steps", "3"], ranks=first)
        ckpt = out / "checkpoint"
        stopped[first] = torch.load(ckpt / "trainer_state.pt", weights_only=False), load_file(ckpt / "model.safetensors")
        launch("train_sft.py", args + ["--out", str(out), "--resume"], ranks=then)
        assert_same_run(one, out)
    (state, weights), (state2, weights2) = stopped[1], stopped[2]
    assert state["step"] == state2["step"] == 3
    assert state["optimizer"]["param_groups"] == state2["optimizer"]["param_groups"]
    assert state["optimizer"]["state"].keys() == state2["optimizer"]["state"].keys()
    for i, moments in state["optimizer"]["state"].items():
        for key, value in moments.items():  # step, exp_avg, exp_avg_sq: whole tensors, keyed by parameter index
            assert torch.allclose(value, state2["optimizer"]["state"][i][key], rtol=1e-4, atol=1e-9), (i, key)
    for name in weights:
        assert torch.allclose(weights[name], weights2[name], rtol=0, atol=1e-5), name


@pytest.fixture(scope="module")
def miner(tmp_path_factory):
    """A tiny R-SFT model that writes well-formed answers with uncertain labels, and 130 rows to mine:
    three chunks of up to 64 rows, so each of two ranks samples some."""
    tmp = tmp_path_factory.mktemp("miner")
    data = rows(130)
    (tmp / "sft-rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[:24]))
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    launch("train_sft.py", ["--model", str(tiny_guard(tmp / "guard")), "--data", str(tmp / "sft-rows.jsonl"), "--dev-size", "0",
                            "--epochs", "30", "--batch-size", "8", "--lr", "1e-2", "--no-report", "--out", str(tmp / "sft")])
    return tmp / "sft", tmp / "rows.jsonl"


def test_mining_and_hs_dpo_on_two_ranks(miner, tmp_path):
    """Two ranks sample exactly the outputs one process samples, so they find the same hard samples;
    HS-DPO on them (the reference log-probs split over the ranks too) then trains as one process."""
    folder, data = miner
    args = ["--sft", str(folder), "--data", str(data), "--k", "4", "--max-new-tokens", "96", "--mine-batch-size", "8",
            "--epochs", "1", "--batch-size", "5", "--grad-accum", "2", "--lr", "1e-3", "--eval-every", "5", "--no-report"]
    # Gradient checkpointing recomputes the same numbers: on the two ranks it checks that FSDP2 composes with it.
    for name, ranks, extra in (("one", 1, []), ("two", 2, ["--gradient-checkpointing"])):
        stdout = launch("train_dpo.py", args + extra + ["--out", str(tmp_path / name)], ranks=ranks)
        assert stdout.count("hard samples; per task") == 1
    one, two = tmp_path / "one", tmp_path / "two"
    hard = (one / "hard_samples.jsonl").read_text()
    assert len(hard.splitlines()) > 100 and (two / "hard_samples.jsonl").read_text() == hard
    assert (one / "mining_summary.json").read_text() == (two / "mining_summary.json").read_text()
    assert [p.name.split(".")[-1] for p in sorted((two / "mining").iterdir())] == ["jsonl", "rank1"]
    assert_same_run(one, two)


def test_a_rank_leaves_the_process_group_with_no_sharded_model_alive(sft_setup, tmp_path):
    """FSDP2's hooks keep a trained model alive in reference cycles; left for interpreter shutdown, its
    gloo work is torn down with the interpreter (an occasional SIGABRT at exit). The exit handler
    gr.distributed registers must collect them before it leaves the process group."""
    args, _ = sft_setup
    script = tmp_path / "run_and_exit.py"
    script.write_text(
        "import atexit, gc, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch.distributed as dist\n"
        "from torch.distributed.fsdp import FSDPModule\n"
        "import train_sft\n"
        "train_sft.main(sys.argv[1:])\n"
        "atexit._run_exitfuncs()\n"
        "alive = sum(isinstance(o, FSDPModule) for o in gc.get_objects())\n"
        "print(f'rank left: {not dist.is_initialized()}, sharded modules alive: {alive}', file=sys.stderr)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(cmd + args + ["--out", str(tmp_path / "out"), "--max-steps", "2"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("rank left: True, sharded modules alive: 0") == 2, result.stderr[-3000:]
