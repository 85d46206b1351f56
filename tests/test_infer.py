"""End-to-end tests of infer.py on a tiny random checkpoint (subprocesses, cwd = repo root): streaming,
--json, --file batches, prompts cut to the context, and one clear line with exit status 2 for bad input."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_guard
from gr.checkpoint import load_model, load_tokenizer
from gr.generate import complete, generate
from gr.guard import Guard
from gr.prompts import raw_prompt


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    folder = tiny_guard(tmp_path_factory.mktemp("infer"))
    return folder, load_model(folder), load_tokenizer(folder)


def infer(*args, env=None):
    """Run infer.py; stdout and stderr as bytes decoded by hand (a random model may write a lone \\r)."""
    proc = subprocess.run([sys.executable, "infer.py", *map(str, args)], cwd=ROOT, capture_output=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def greedy(model, tok, prompt, response=None, n=8):
    """What infer.py must produce: the prompt's ids and the decoded greedy output."""
    ids = tok.encode(raw_prompt(prompt, response))
    out = generate(model, [ids], max_new_tokens=n, stop_ids=tok.stop_ids, pad_id=tok.pad_id)[0]
    return ids, out, tok.decode(out)


def test_json_mode_prints_one_object(guard):
    folder, model, tok = guard
    rc, out, err = infer("How do I bake bread?", "--response", "Knead, rest, bake.", "--model", folder,
                         "--max-new-tokens", 8, "--json")
    assert rc == 0, err
    result = json.loads(out)
    ids, tokens, text = greedy(model, tok, "How do I bake bread?", "Knead, rest, bake.")
    assert list(result) == ["model", "prompt", "response", "labels", "probabilities", "parse_error", "input_truncated",
                            "hit_max_new_tokens", "output", "prompt_tokens", "new_tokens", "seconds", "mode"]
    assert (result["prompt"], result["response"]) == ("How do I bake bread?", "Knead, rest, bake.")
    assert (result["output"], result["prompt_tokens"], result["new_tokens"]) == (text, len(ids), len(tokens))
    # A random model writes no Answers block: the labels are unknown, never a default, and the flags say why.
    assert result["labels"] == {"request": "unknown", "completion": "unknown", "response": "unknown"}
    assert result["probabilities"] == {"request": None, "completion": None, "response": None}
    assert (result["parse_error"], result["hit_max_new_tokens"], result["input_truncated"]) == (True, True, 0)
    assert result["seconds"] >= 0 and err == ""


def test_streams_the_output_then_prints_the_verdict(guard):
    folder, model, tok = guard
    rc, out, err = infer("Tell me a joke.", "--model", folder, "--max-new-tokens", 8)
    assert rc == 0, err
    _, _, text = greedy(model, tok, "Tell me a joke.")
    assert out == text + ("\n\n=== verdict ===\nRequest:  unknown\nResponse: no response given\n"
                          "Flags:    parse_error, hit_max_new_tokens\n")


def test_file_mode_round_trips_in_input_order(guard, tmp_path):
    folder, model, tok = guard
    rows = [{"prompt": "How do I bake bread?"}, {"prompt": "Tell me a joke.", "response": "Why did the chicken..."},
            {"prompt": "Hi", "response": None}]
    lines = [json.dumps(r) for r in rows]
    (tmp_path / "in.jsonl").write_text("\n".join(lines[:2] + ["", lines[2]]) + "\n")
    rc, out, err = infer("--file", tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl", "--model", folder,
                         "--max-new-tokens", 8, "--batch-size", 2)
    assert rc == 0, err
    assert out == "" and "guarding" in err  # the progress bar is on stderr
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = complete(model, tok, [raw_prompt(r["prompt"], r.get("response")) for r in rows], max_new_tokens=8)
    assert [(r["prompt"], r["response"]) for r in results] == [(r["prompt"], r.get("response")) for r in rows]
    assert [r["output"] for r in results] == [c[0].text for c in expected]
    assert [(r["prompt_tokens"], r["new_tokens"]) for r in results] == \
        [(c[0].prompt_tokens, len(c[0].tokens)) for c in expected]
    assert [r["line"] for r in results] == [1, 2, 4]
    assert all(set(r) == {"line", "model", "prompt", "response", "labels", "probabilities", "parse_error",
                          "input_truncated", "hit_max_new_tokens", "output", "prompt_tokens", "new_tokens", "seconds",
                          "mode"} for r in results)
    assert "judged 3 lines: 3 parse errors, 0 inputs cut to fit, 3 outputs stopped at --max-new-tokens" in err


def test_long_input_is_cut_with_a_warning_and_the_framing_kept(guard, tmp_path):
    folder, model, tok = guard
    long = "bake bread " * 400
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    rc, out, err = infer("--file", tmp_path / "in.jsonl", "--model", folder, "--max-new-tokens", 8)
    assert rc == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in results] == ["Hi", long]  # the results name the input as given
    kept = results[1]["prompt_tokens"]
    cut = len(tok.encode(raw_prompt(long))) - kept
    assert kept <= 512 - 8 and cut > 0
    warning = [line for line in err.splitlines() if line.startswith("warning")]
    assert warning == [f"warning: {tmp_path / 'in.jsonl'}: line 2: the input is longer than the 504 tokens the model's "
                       f"context of 512 leaves for it; cut {cut} tokens off the end of the user's text"]


@pytest.mark.parametrize("case", ["empty prompt", "missing file", "a folder", "not JSON", "no prompt", "empty response",
                                  "not an object", "out is a folder", "out under a file", "device mps"])
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path):
    path = tmp_path / "in.jsonl"
    lines = {"not JSON": ['{"prompt": "a"}', "{prompt: b}"], "no prompt": ['{"prompt": "a"}', "", '{"prompt": 5}'],
             "empty response": ['{"prompt": "a", "response": " "}'], "not an object": ['{"prompt": "a"}', '["b"]']}
    if case != "missing file":
        path.write_text("\n".join(lines.get(case, ['{"prompt": "a"}'])) + "\n")
    args = {"empty prompt": ["  "], "a folder": ["--file", tmp_path], "out is a folder": ["--file", path, "--out", tmp_path],
            "out under a file": ["--file", path, "--out", path / "out.jsonl"],
            "device mps": ["--file", path, "--device", "mps"]}.get(case, ["--file", path])
    rc, out, err = infer(*args, "--model", tmp_path / "no-model")  # input is checked before the model loads
    message = {
        "empty prompt": "the prompt is empty: give the user's request to judge",
        "missing file": f"no such file: {path}",
        "a folder": f"cannot read {tmp_path}: Is a directory",
        "not JSON": f"{path}:2 is not valid JSON (Expecting property name enclosed in double quotes)",
        "no prompt": f'{path}: line 3 has no string "prompt" (lines are {{"prompt": ..., "response": ...}})',
        "empty response": f"{path}: line 1: the response is empty: leave it out when there is no AI response",
        "not an object": f"{path}:2 is not a JSON object",
        "out is a folder": f"{tmp_path} is a folder, not a file",
        "out under a file": f"cannot write {path / 'out.jsonl'}: {path} is a file",
        "device mps": "--device mps is not supported: use cpu or cuda (cuda:N for one GPU of several)",
    }[case]
    assert (rc, out, err) == (2, "", f"error: {message}\n")


def test_model_not_cached_offline_says_to_pass_model(tmp_path):
    rc, out, err = infer("Hi", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert rc == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: 'yueliu1999/GuardReasoner-1B' is not in the Hugging Face cache")
    assert err.endswith("or pass a local checkpoint folder with --model DIR\n")


def test_streaming_prints_whole_characters_as_they_complete(guard, monkeypatch):
    import infer
    from gr import generate as generation
    from gr.guard import Guard

    _, model, tok = guard
    ids = tok.encode("a✓b✓", bos=False)
    assert len(ids) == 8  # "✓" is three byte tokens this tokenizer never merged

    def fake_generate(model, prompts, *, on_token, **kw):
        for t in ids:
            on_token(0, t)
        return [ids]

    chunks = []
    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr(sys, "stdout", type("Recorder", (), {"write": lambda self, s: chunks.append(s),
                                                             "flush": lambda self: None})())
    result = infer.guard_one(Guard(model, tok, max_new_tokens=8), "Hi", None, "model", stream=True)
    assert chunks == ["a", "✓", "b", "✓", "\n"] and result["output"] == "a✓b✓"


def test_file_results_are_written_as_they_are_made_and_a_rerun_continues(guard, tmp_path, monkeypatch, capsys):
    """A run killed after its first batch keeps that batch's lines; the rerun judges only the rest."""
    import infer

    folder, model, tok = guard
    rows = [{"prompt": f"question {i}"} for i in range(6)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = ["--file", str(tmp_path / "in.jsonl"), "--out", str(out), "--model", str(folder), "--max-new-tokens", "4",
            "--batch-size", "1"]  # a chunk of four interactions per write
    judged, real = [], Guard.judge

    def killed_after_one_chunk(self, interactions, **kw):
        if judged:
            raise KeyboardInterrupt
        judged.append(len(interactions))
        return real(self, interactions, **kw)

    monkeypatch.setattr(Guard, "judge", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        infer.main(args)
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1, 2, 3, 4]
    judged.clear()
    monkeypatch.setattr(Guard, "judge", lambda self, interactions, **kw: judged.append(len(interactions)) or real(self, interactions, **kw))
    infer.main(args)
    assert judged == [2] and "already holds 4 of these lines" in capsys.readouterr().err
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in results] == [1, 2, 3, 4, 5, 6]
    expected = complete(model, tok, [raw_prompt(r["prompt"]) for r in rows], max_new_tokens=4)
    assert [r["output"] for r in results] == [c[0].text for c in expected]
