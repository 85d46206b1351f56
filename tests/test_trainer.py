"""The shared training loop: exact resume, logs and plots, and the R-SFT script end to end."""

import json
import re
import subprocess
import sys

import matplotlib
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT
from gr import GRError
from gr.checkpoint import load_model, load_tokenizer
from gr.data import Example, IGNORE, load_shipped
from gr.model import ModelConfig, Transformer
from gr.rsft import SFTTask
from gr.trainer import TrainConfig, cosine_schedule, plot_loss, train


def tiny_task(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 6 + i % 5
        ids = torch.randint(0, 50, (length,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * 3 + ids[3:]))
    return SFTTask(examples, examples[:3], pad_id=0)


def tiny_model(seed=0):
    model = Transformer(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.init_weights(seed=seed)
    return model


def run(tmp_path, name, **kw):
    cfg = TrainConfig(out_dir=str(tmp_path / name), lr=1e-2, epochs=2, batch_size=2, grad_accum=2, warmup_ratio=0.2, **kw)
    return cfg


def test_resume_reaches_the_same_parameters(tmp_path):
    straight = tiny_model()
    log_a, done = train(straight, tiny_task(), run(tmp_path, "a"))
    assert done and len(log_a) == 6  # 12 items / (2 x 2) per step x 2 epochs

    stopped = tiny_model()
    log_b, done = train(stopped, tiny_task(), run(tmp_path, "b", max_steps=4))
    assert not done and len(log_b) == 4 and (tmp_path / "b" / "checkpoint" / "trainer_state.pt").exists()
    resumed = tiny_model(seed=123)  # different weights: everything must come from the checkpoint
    log_c, done = train(resumed, tiny_task(), run(tmp_path, "b"), resume=True)
    assert done and [r["step"] for r in log_c] == list(range(1, 7))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    assert [r["loss"] for r in log_c] == [r["loss"] for r in log_a]
    assert not (tmp_path / "b" / "checkpoint").exists()
    lines = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 7))
    assert (tmp_path / "b" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dev_loss" in log_c[-1]


def test_loss_goes_down_and_lr_follows_the_schedule(tmp_path):
    log, _ = train(tiny_model(), tiny_task(), run(tmp_path, "s"))
    assert log[-1]["loss"] < log[0]["loss"]
    assert [r["lr"] for r in log] == [1e-2 * cosine_schedule(s, 6, 1) for s in range(6)]
    assert cosine_schedule(0, 10, 0) == 1.0 and cosine_schedule(5, 10, 0) == 0.5


def test_train_sft_script_end_to_end(tmp_path):
    """A small run of the real script on shipped rows; its folder is a complete Hugging Face model."""
    rows = load_shipped()[:30]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cmd = [sys.executable, "train_sft.py", "--data", str(data), "--dev-size", "6", "--epochs", "1", "--batch-size", "6",
           "--out", str(out), "--report-max-new-tokens", "4"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dev outputs with a full Answers block" in result.stdout and "try it: python infer.py --model" in result.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train_log.jsonl",
            "loss.png"} <= {p.name for p in out.iterdir()}
    text = rows[0]["instruction"] + "\n" + rows[0]["input"]
    ref_tok = AutoTokenizer.from_pretrained(out)
    ids = load_tokenizer(out).encode(text)
    assert ref_tok(text)["input_ids"] == ids
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (ref(x).logits - load_model(out)(x)).abs().max().item() <= 1e-4


def test_train_sft_leave_one_source_out_and_errors(tmp_path):
    rows = [dict(r, source="aegis") for r in load_shipped()[:10]]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "train_sft.py", "--data", str(data), "--exclude-source", "wildguard", "--out", str(tmp_path / "x")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"error: no training rows come from source 'wildguard' in {data}"
    result = subprocess.run([sys.executable, "train_sft.py", "--resume", "--out", str(tmp_path / "none")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nothing to resume" in result.stderr and "Traceback" not in result.stderr


def test_fine_tuning_smollm2_lowers_the_loss(smollm2, tmp_path):
    """A few R-SFT steps on real pretrained weights (our loader, our loop) lower the loss on those rows."""
    from gr.data import encode_rows

    tok = load_tokenizer(smollm2)
    examples, _ = encode_rows(tok, load_shipped()[:4], "raw", cutoff=384)
    task = SFTTask(examples, examples, tok.pad_id)
    model = load_model(smollm2, dtype=torch.float32)
    before = task.evaluate(model)["dev_loss"]
    log, done = train(model, task, TrainConfig(out_dir=str(tmp_path / "smol"), lr=5e-5, epochs=3, batch_size=4),
                      tokenizer_dir=smollm2)
    assert done and len(log) == 3
    assert log[-1]["dev_loss"] < before - 0.1, (before, log[-1]["dev_loss"])


@pytest.mark.parametrize("args, message", [
    (["--out", "."], "names no folder of its own"),
    (["--out", ".."], "names no folder of its own"),
    (["--out", "{file}"], "is a file, not a folder"),
    (["--out", "{file}/run"], "cannot be created"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1, not 0"),
    (["--lr", "-1"], "--lr must be above 0, not -1.0"),
    (["--epochs", "0"], "--epochs must be at least 1, not 0"),
    (["--cutoff", "5"], "--cutoff must be at least 16, not 5"),
    (["--max-steps", "-1"], "--max-steps must be at least 0, not -1"),
    (["--device", "mps"], "--device mps is not supported"),
    (["--data", "{missing}"], "no such file"),
    (["--resume"], "nothing to resume"),
])
def test_train_sft_checks_settings_before_any_work(tmp_path, args, message):
    """Each of these once trained (or wrote) first and failed later, or ended in a traceback."""
    import train_sft

    (tmp_path / "file").write_text("x")
    args = [a.format(file=tmp_path / "file", missing=tmp_path / "missing.jsonl") for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "run")]
    with pytest.raises(GRError, match=re.escape(message)):
        train_sft.main(args + out)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_cutoff_that_leaves_no_output_is_an_error_not_an_untrained_model(tmp_path):
    import train_sft

    rows = load_shipped()[:4]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(GRError, match="no training row keeps any output within --cutoff 16"):
        train_sft.main(["--data", str(data), "--dev-size", "1", "--cutoff", "16", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_user_error_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "train_sft.py", "--out", "."], cwd=ROOT, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: --out . names no folder of its own: give a new or existing folder, e.g. out/run\n"


def test_resume_finds_a_checkpoint_a_kill_left_under_its_temporary_name(tmp_path):
    """Killed while swapping in a newer checkpoint (the fallback's two renames): the newer one is used."""
    from gr.checkpoint import RESUME_DIR
    from gr.files import temporary_dir

    log, done = train(tiny_model(), tiny_task(), run(tmp_path, "k", max_steps=4))
    ckpt = tmp_path / "k" / RESUME_DIR
    ckpt.rename(temporary_dir(ckpt))  # as if killed after moving the old one away, before moving this one in
    resumed = tiny_model(seed=5)
    log_c, done = train(resumed, tiny_task(), run(tmp_path, "k"), resume=True)
    assert done and [r["step"] for r in log_c] == list(range(1, 7))
    straight = tiny_model()
    train(straight, tiny_task(), run(tmp_path, "s2"))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_the_loss_curve_leaves_the_plotting_backend_as_it_was(tmp_path):
    """A notebook that trains keeps its inline plots: drawing loss.png does not switch pyplot's backend."""
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_loss([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "dev_loss": 1.5}], tmp_path / "loss.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
