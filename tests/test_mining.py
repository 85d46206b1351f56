"""Hard-sample mining (section 5) on hand-made outputs, the generation cache, and HS-DPO end to end."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT, tiny_guard
from gr import GRError, mining
from gr.checkpoint import load_model, load_tokenizer
from gr.mining import HardSample, find_hard, load_hard_samples, merge_ensemble, normalize_weights, sample_outputs, summarize
from gr.guard import Guard
from gr.prompts import INSTRUCTION, format_answers, format_input


def row(request="harmful", completion="refusal", response="unharmful", with_response=True, source="wildguard", text="q"):
    return {"instruction": INSTRUCTION, "input": format_input(text, "r" if with_response else None),
            "output": "# Task 1\n\nx\n\n# Task 3\n\ny\n\n" + format_answers(request, completion if with_response else None,
                                                       response if with_response else None), "source": source}


def out(request, completion="refusal", response="unharmful", pad=""):
    return "# Task 3\n\nreasoning" + pad + "\n---\n\nAnswers: \n" + f"Request: {request}\nCompletion: {completion}\nResponse: {response}\n"


def test_request_disagreement_comes_first():
    outputs = [out("harmful", response="harmful"), out("unharmful"), out("harmful", pad="xx"), out("harmful", response="harmful")]
    h = find_hard(row(), outputs)
    assert h.task == "request" and h.d == 1 - 3
    assert h.chosen == outputs[2]  # the longest of the three right outputs
    assert h.rejected == outputs[1]


def test_then_response_then_completion():
    outputs = [out("harmful", "compliance", "harmful"), out("harmful", "refusal", "unharmful")]
    assert find_hard(row(), outputs).task == "response"  # both tasks disagree; response is checked first
    outputs = [out("harmful", "compliance", "unharmful"), out("harmful", "refusal", "unharmful"), out("harmful", "compliance", "unharmful")]
    h = find_hard(row(), outputs)
    assert (h.task, h.d, h.chosen) == ("completion", 2 - 1, outputs[1])
    assert find_hard(row(), [out("harmful")] * 4) is None  # all right: not hard
    assert find_hard(row(), [out("unharmful")] * 4) is None  # all wrong: not ambiguous either


def test_prompt_only_rows_and_missing_gold_use_the_request_only():
    outputs = [out("harmful", "None", "None"), out("harmful", "refusal", "harmful")]
    assert find_hard(row(with_response=False), outputs) is None
    no_gold = row()
    no_gold["output"] = "# Task 1\n\n" + format_answers("harmful", None, "unharmful")
    outputs = [out("harmful", "compliance", "unharmful"), out("harmful", "refusal", "unharmful")]
    assert find_hard(no_gold, outputs) is None  # no gold completion label: no vote on it


def test_unparseable_outputs_have_no_vote():
    outputs = [out("harmful"), "I think it is unharmful.", "Answers: \nRequest: unharmful\n", out("harmful", pad="longer")]
    assert find_hard(row(), outputs) is None  # the two wrong ones do not parse into a full block
    h = find_hard(row(), outputs + [out("unharmful")])
    assert h.d == 1 - 2 and h.rejected == out("unharmful")


def test_weights_are_min_max_normalized_into_0_8_1_2():
    samples = [HardSample({}, "request", "a", "b", d) for d in (-3, -1, 1, 3)]
    assert [s.weight for s in normalize_weights(samples)] == pytest.approx([0.8, 0.9333333, 1.0666667, 1.2])
    same = [HardSample({}, "request", "a", "b", 0) for _ in range(3)]
    assert [s.weight for s in normalize_weights(same)] == [1.0, 1.0, 1.0]
    assert normalize_weights([]) == []


def test_ensemble_merges_per_source_and_deduplicates():
    main = [HardSample(row(text="a", source="aegis"), "request", "c", "r", -2),
            HardSample(row(text="b", source="wildguard"), "request", "c", "r", 0)]
    left_out = {
        "aegis": [HardSample(row(text="a", source="aegis"), "request", "c2", "r2", 2),  # duplicate input: main's stays
                  HardSample(row(text="c", source="aegis"), "request", "c", "r", 2),
                  HardSample(row(text="d", source="wildguard"), "request", "c", "r", 2)],  # not its left-out source
        "wildguard": [HardSample(row(text="e", source="wildguard"), "response", "c", "r", 0)],
    }
    merged = merge_ensemble(main, left_out)
    assert [(h.row["input"], h.chosen) for h in merged] == [
        (format_input("a", "r"), "c"), (format_input("b", "r"), "c"), (format_input("c", "r"), "c"), (format_input("e", "r"), "c")]
    assert [h.weight for h in merged] == pytest.approx([0.8, 1.0, 1.2, 1.0])
    summary = summarize(10, merged)
    assert summary["per_task"] == {"request": 3, "response": 1} and summary["per_source"] == {"aegis": 2, "wildguard": 2}
    assert summary["weight_histogram"] == {"0.8-0.9": 1, "0.9-1.0": 0, "1.0-1.1": 2, "1.1-1.2": 1}


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    folder = tiny_guard(tmp_path_factory.mktemp("miner"))
    return folder, load_model(folder), load_tokenizer(folder)


def test_generation_cache_resumes_a_killed_run(guard, tmp_path, monkeypatch):
    _, model, tok = guard
    miner = Guard(model, tok, max_new_tokens=6)
    rows = [row(text=f"question {i}") for i in range(5)]
    kw = dict(k=3, batch_size=2, seed=7, chunk=2)
    full = sample_outputs(miner, rows, tmp_path / "a.jsonl", **kw)
    assert len(full) == 5 and all(len(o) == 3 for o in full) and len({o for outs in full for o in outs}) > 3
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    # A run killed while writing its third row: two whole lines and half of one.
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    asked = []
    real = miner.generate
    monkeypatch.setattr(miner, "generate", lambda prompts, **a: asked.append(len(prompts)) or real(prompts, **a))
    assert sample_outputs(miner, rows, tmp_path / "b.jsonl", **kw) == full
    assert sum(asked) == 3  # only the rows that were not cached
    assert sample_outputs(miner, rows, tmp_path / "b.jsonl", **kw) == full and sum(asked) == 3
    assert (tmp_path / "b.jsonl").read_text().splitlines() == lines[:2] + (tmp_path / "b.jsonl").read_text().splitlines()[2:]


def test_train_dpo_end_to_end_on_given_hard_samples(guard, tmp_path):
    """HS-DPO on hand-made pairs: reward accuracy rises, and the output loads in transformers."""
    folder, model, tok = guard
    hard = []
    for i in range(8):
        r = row(text=f"how do I do thing {i}?", source="aegis")
        hard.append({"row": r, "task": "request", "chosen": out("harmful"), "rejected": out("unharmful", pad=" no"),
                     "d": i % 3, "weight": 1.0})
    path = tmp_path / "hard.jsonl"
    path.write_text("".join(json.dumps(h) + "\n" for h in hard))
    assert len(load_hard_samples(path)) == 8
    run = tmp_path / "dpo"
    cmd = [sys.executable, "train_dpo.py", "--sft", str(folder), "--hard-samples", str(path),
           "--out", str(run), "--epochs", "2", "--batch-size", "2", "--lr", "1e-2", "--eval-every", "2", "--no-report"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    accuracy = [r["pairs_reward_accuracy"] for r in log if "pairs_reward_accuracy" in r]
    assert accuracy[-1] > 0.5 and "reward accuracy / margin on the mined pairs" in result.stdout
    assert json.loads((run / "mining_summary.json").read_text())["hard_samples"] == 8
    x = torch.tensor([tok.encode(INSTRUCTION + "\n" + format_input("hello"))])
    ref = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = load_model(run)(x)
        assert (ref(x).logits - ours).abs().max().item() <= 1e-4
        assert (ours - model(x)).abs().max().item() > 1e-3  # it did train


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "--k must be at least 2, not 0"),
    (["--k", "1"], "--k must be at least 2, not 1"),
    (["--hard-samples", "{not_json}"], "is not valid JSON"),
    (["--hard-samples", "{not_hard}"], "is not a hard sample"),
    (["--hard-samples", "{empty}"], "holds no hard samples"),
    (["--data", "{missing}"], "no such file"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--beta", "0"], "--beta must be above 0"),
])
def test_train_dpo_checks_everything_before_any_training_or_mining(tmp_path, args, message):
    """No R-SFT model exists at the preset's path: a bad setting must fail before train_dpo trains one."""
    import train_dpo

    (tmp_path / "not_json.jsonl").write_text("{oops\n")
    (tmp_path / "not_hard.jsonl").write_text(json.dumps({"row": {"input": "x"}, "chosen": 1}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    args = [a.format(**{n: tmp_path / f"{n}.jsonl" for n in ("not_json", "not_hard", "empty", "missing")}) for a in args]
    out = tmp_path / "dpo"
    with pytest.raises(GRError, match=message):
        train_dpo.main(args + ["--sft", str(tmp_path / "no-sft"), "--out", str(out)])
    assert not out.exists() and not (tmp_path / "no-sft").exists()
