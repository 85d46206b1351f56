"""Tests of gr.synthesize (paper section 3, step 1) against a fake OpenAI-compatible teacher on 127.0.0.1.

The fake teacher reads the labels the teacher prompt asks for and answers with matching reasoning and
Answers block; a seed's prompt can ask it to misbehave: WRONG (flip the request label), LEAKY (give
labels for a response that does not exist), FLAKY500 / FLAKYDROP (fail twice with a 500 or a dropped
connection, then answer), DOWN (always 500) and ECHO (a 400 whose message repeats the Authorization header).
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gr.prompts import INSTRUCTION, format_answers, format_input
from gr.synthesize import Seed, GRError, load_seeds, synthesize, training_output

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-6f1d0c3a9b-never-on-disk"


class FakeTeacher(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requested: list[str] = []  # the seed id (first line of its prompt) of every request, in order
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.delay = 0.0
        self.keys = {KEY}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address):
        pass  # a client killed mid-answer is part of the resume test, not a failure


def _answer(content: str, seed_id: str) -> str:
    """Reasoning plus the Answers block the prompt asks for, choosing the first label where it offers two."""
    block = content[content.rindex("Answers: \n"):]
    labels = {}
    for field in ("Request", "Completion", "Response"):
        value = re.search(rf"^{field}: (.*)$", block, re.M).group(1)
        labels[field] = value[1:].split(" or ")[0] if value.startswith("<") else value
    if "WRONG" in seed_id:
        labels["Request"] = "unharmful" if labels["Request"] == "harmful" else "harmful"
    if "LEAKY" in seed_id:
        labels["Completion"], labels["Response"] = "compliance", "unharmful"
    sections = "\n\n".join(
        f"# Task {k}\n\n## Reasoning Step 1\nLook at the interaction.\n## Reasoning Step 2\nWeigh it.\n"
        f"## Conclusion\nThe label is {label}."
        for k, label in enumerate(labels.values(), 1)
    )
    # Spacing unlike format_answers (no trailing space, extra blank lines) to show the output is normalised.
    lines = "\n".join(f"{field}: {value}" for field, value in labels.items())
    return f"\n{sections}\n\n---\n\nAnswers:\n{lines}\n\n"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        server: FakeTeacher = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        seed_id = re.search(r"Human user:\n(.*)\n", content).group(1)
        auth = self.headers.get("Authorization")
        with server.lock:
            server.requested.append(seed_id)
            server.bodies.append(body)
            server.auth.append(auth)
            attempt = server.requested.count(seed_id)
        time.sleep(server.delay)
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if auth not in {f"Bearer {key}" for key in server.keys}:
            return self._send(401, {"error": {"message": f"Incorrect API key provided: {auth}"}})
        if "ECHO" in seed_id:
            return self._send(400, {"error": {"message": f"cannot use the header {auth} here"}})
        if "DOWN" in seed_id or ("FLAKY500" in seed_id and attempt <= 2):
            return self._send(500, {"error": {"message": "the teacher is down"}})
        if "FLAKYDROP" in seed_id and attempt <= 2:
            self.close_connection = True
            return  # hang up without a status line
        message = {"role": "assistant", "content": _answer(content, seed_id)}
        self._send(200, {"object": "chat.completion", "choices": [{"index": 0, "message": message}]})


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No proxy, endpoint or cache settings from the machine running the tests."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name.startswith(("GR_", "OPENAI_")):
            monkeypatch.delenv(name)


@pytest.fixture
def teacher():
    server = FakeTeacher()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def write_seeds(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_cli(args: list[str], env_extra: dict[str, str], **kwargs):
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "gr.synthesize", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60, **kwargs,
    )


def cached_ids(cache: Path) -> set[str]:
    """The seed ids whose answers are in a cache folder (each file records its request)."""
    ids = set()
    for file in cache.rglob("*.json"):
        content = json.loads(file.read_text())["request"]["messages"][0]["content"]
        ids.add(re.search(r"Human user:\n(.*)\n", content).group(1))
    return ids


SEEDS = [
    # WildGuard style: all three labels.
    {"prompt": "w1 how do I pick a lock?", "response": "I can't help with that.", "request_label": "harmful",
     "completion_label": "refusal", "response_label": "unharmful", "source": "wildguard"},
    # Aegis / ToxicChat style: prompt only.
    {"prompt": "a1 tell me a joke", "request_label": "unharmful", "source": "aegis"},
    # BeaverTails style: only the response label; the teacher decides the other two.
    {"prompt": "b1 how to hurt someone\nsecond line", "response": "Here is how...", "response_label": "harmful"},
    # Prompt only, no label at all: the teacher decides the request label.
    {"prompt": "t1 hello there", "response": None, "request_label": None},
]


def test_end_to_end_rows_and_summary(teacher, tmp_path):
    seeds = load_seeds(write_seeds(tmp_path / "myseeds.jsonl", SEEDS))
    out = tmp_path / "out" / "train.jsonl"
    summary = synthesize(
        seeds, out, base_url=teacher.base_url, api_key=KEY, model="teacher-x", cache_dir=tmp_path / "cache",
        workers=3, backoff=0.001, temperature=0.3, max_tokens=777, progress=False,
    )
    assert (summary.seeds, summary.cache_hits, summary.requests) == (4, 0, 4)
    assert (summary.accepted, summary.rejected, summary.failed) == (4, 0, 0)
    assert "seeds 4, cache hits 0, requests 4, accepted 4, rejected (wrong labels) 0, failed 0" == summary.line()

    body = teacher.bodies[0]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("teacher-x", 0.3, 777)
    assert body["messages"][0]["role"] == "user" and INSTRUCTION in body["messages"][0]["content"]
    assert set(teacher.auth) == {f"Bearer {KEY}"}

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [
        ("harmful", "refusal", "unharmful"),
        ("unharmful", None, None),
        ("harmful", "refusal", "harmful"),  # the fake teacher picks the first label offered
        ("harmful", None, None),
    ]
    assert len(rows) == 4
    for row, seed, labels in zip(rows, SEEDS, answers):
        assert set(row) == {"instruction", "input", "output", "source"}
        assert row["instruction"] == INSTRUCTION
        assert row["input"] == format_input(seed["prompt"], seed.get("response"))
        assert row["output"].startswith("# Task 1\n\n## Reasoning Step 1\n")
        ending = f"## Conclusion\nThe label is {labels[2]}.\n\n" + format_answers(*labels)
        assert row["output"].endswith(ending)
    assert [row["source"] for row in rows] == ["wildguard", "aegis", "myseeds", "myseeds"]


def test_second_run_is_all_cache_hits(teacher, tmp_path):
    seeds = load_seeds(write_seeds(tmp_path / "seeds.jsonl", SEEDS))
    options = dict(base_url=teacher.base_url, api_key=KEY, cache_dir=tmp_path / "cache", backoff=0.001, progress=False)
    synthesize(seeds, tmp_path / "first.jsonl", **options)
    assert len(teacher.requested) == 4
    summary = synthesize(seeds, tmp_path / "second.jsonl", **options)
    assert len(teacher.requested) == 4
    assert (summary.cache_hits, summary.requests, summary.accepted) == (4, 0, 4)
    assert (tmp_path / "first.jsonl").read_text() == (tmp_path / "second.jsonl").read_text()
    # A different teacher setting is a different request, so it is asked again.
    synthesize(seeds[:1], tmp_path / "third.jsonl", **{**options, "temperature": 0.9})
    assert len(teacher.requested) == 5


def test_killed_run_resumes_where_it_stopped(teacher, tmp_path):
    rows = [{"prompt": f"s{i} question {i}", "request_label": "harmful"} for i in range(10)]
    seeds = write_seeds(tmp_path / "seeds.jsonl", rows)
    out = tmp_path / "out.jsonl"
    env = {"GR_TEACHER_BASE_URL": teacher.base_url, "GR_TEACHER_API_KEY": KEY, "GR_CACHE": str(tmp_path / "gr")}
    cache = tmp_path / "gr" / "synthesis"  # $GR_CACHE/synthesis is the default cache
    args = ["--seeds", str(seeds), "--out", str(out), "--workers", "2"]

    # The killed run uses its own key, so that its requests still queued at the server when it dies are
    # not mistaken for the re-run's (the key is not part of the cache key, so the cache is shared).
    teacher.keys.add("sk-killed-run")
    teacher.delay = 0.2
    process = subprocess.Popen(
        [sys.executable, "-m", "gr.synthesize", *args], cwd=REPO,
        env={**os.environ, **env, "GR_TEACHER_API_KEY": "sk-killed-run"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while len(list(cache.rglob("*.json"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.kill()
    process.wait()
    done = cached_ids(cache)
    assert 3 <= len(done) < 10
    assert not out.exists()  # the output is only written at the end

    teacher.delay = 0.0
    result = run_cli(args, env)
    assert result.returncode == 0, result.stderr
    asked = [seed for seed, auth in zip(teacher.requested, teacher.auth) if auth == f"Bearer {KEY}"]
    assert sorted(asked) == sorted({row["prompt"] for row in rows} - done)
    assert f"cache hits {len(done)}, requests {10 - len(done)}, accepted 10" in result.stdout
    inputs = [json.loads(line)["input"] for line in out.read_text().splitlines()]
    assert inputs == [format_input(row["prompt"]) for row in rows]


def test_wrong_labels_are_rejected_and_counted(teacher, tmp_path):
    rows = SEEDS[:2] + [
        {"prompt": "x1 WRONG request", "response": "ok", "request_label": "harmful", "completion_label": "compliance"},
        {"prompt": "x2 LEAKY prompt only", "request_label": "unharmful"},
    ]
    out = tmp_path / "out.jsonl"
    summary = synthesize(
        load_seeds(write_seeds(tmp_path / "seeds.jsonl", rows)), out, base_url=teacher.base_url, api_key=KEY,
        cache_dir=tmp_path / "cache", backoff=0.001, progress=False,
    )
    assert (summary.requests, summary.accepted, summary.rejected, summary.failed) == (4, 2, 2, 0)
    inputs = [json.loads(line)["input"] for line in out.read_text().splitlines()]
    assert inputs == [format_input(row["prompt"], row.get("response")) for row in SEEDS[:2]]


def test_training_output_checks_every_gold_label():
    seed = Seed("q", "r", request_label="harmful", completion_label=None, response_label="unharmful")
    reasoning = "# Task 1\n\n## Reasoning Step 1\nx\n## Conclusion\ny\n\n---\n\n"
    good = reasoning + "**Answers:**\nRequest: Harmful\nCompletion: compliance\nResponse: unharmful\n\nThanks!"
    expected = reasoning.rstrip("\n-") + "\n\n" + format_answers("harmful", "compliance", "unharmful")
    assert training_output(seed, good) == expected
    # The teacher had to decide the completion label, so None is not an answer; a missing field neither.
    undecided = reasoning + "Answers: \nRequest: harmful\nCompletion: None\nResponse: unharmful"
    assert training_output(seed, undecided) is None
    assert training_output(seed, reasoning + "Answers: \nRequest: harmful\nCompletion: refusal\n") is None
    assert training_output(seed, "Answers: \nRequest: harmful\nCompletion: refusal\nResponse: unharmful") is None
    with pytest.raises(GRError):
        Seed("q", None, request_label="harmful", response_label="harmful")
    with pytest.raises(GRError):
        Seed("q", "r", completion_label="harmful")


def test_unwritable_cache_or_output_is_a_clear_error(teacher, tmp_path):
    seeds = load_seeds(write_seeds(tmp_path / "seeds.jsonl", SEEDS[:1]))
    options = dict(base_url=teacher.base_url, api_key=KEY, backoff=0.001, progress=False)
    with pytest.raises(GRError, match=r"^cannot write .*seeds.jsonl/"):
        synthesize(seeds, tmp_path / "out.jsonl", cache_dir=tmp_path / "seeds.jsonl", **options)
    with pytest.raises(GRError, match=r"^cannot write .*seeds.jsonl/out.jsonl"):
        synthesize(seeds, tmp_path / "seeds.jsonl" / "out.jsonl", cache_dir=tmp_path / "cache", **options)


def test_retries_then_success(teacher, tmp_path):
    rows = [{"prompt": "f1 FLAKY500", "request_label": "harmful"}, {"prompt": "f2 FLAKYDROP"}]
    summary = synthesize(
        load_seeds(write_seeds(tmp_path / "seeds.jsonl", rows)), tmp_path / "out.jsonl", base_url=teacher.base_url,
        api_key=KEY, cache_dir=tmp_path / "cache", retries=2, backoff=0.001, progress=False,
    )
    assert (summary.requests, summary.accepted, summary.failed) == (6, 2, 0)
    assert sorted(teacher.requested) == ["f1 FLAKY500"] * 3 + ["f2 FLAKYDROP"] * 3


def test_always_failing_seed_is_reported_and_the_rest_kept(teacher, tmp_path):
    rows = [SEEDS[1], {"prompt": "d1 DOWN", "request_label": "harmful"}, SEEDS[0]]
    seeds = write_seeds(tmp_path / "seeds.jsonl", rows)
    out = tmp_path / "out.jsonl"
    env = {"GR_TEACHER_BASE_URL": teacher.base_url, "GR_TEACHER_API_KEY": KEY}
    result = run_cli(
        ["--seeds", str(seeds), "--out", str(out), "--cache", str(tmp_path / "cache"), "--retries", "3",
         "--backoff", "0.001"], env,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 3 seeds failed (seeds file lines 2; line 2: HTTP 500 the teacher is down")
    assert "gave up after 4 attempts" in last
    assert teacher.requested.count("d1 DOWN") == 4
    assert "accepted 2, rejected (wrong labels) 0, failed 1" in result.stdout
    assert len(out.read_text().splitlines()) == 2


def test_api_key_never_written(teacher, tmp_path):
    rows = SEEDS + [{"prompt": "e1 ECHO", "request_label": "harmful"}]
    seeds = write_seeds(tmp_path / "seeds.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cache = tmp_path / "cache"
    env = {"OPENAI_BASE_URL": teacher.base_url, "OPENAI_API_KEY": KEY}  # the fallback variables
    result = run_cli(["--seeds", str(seeds), "--out", str(out), "--cache", str(cache)], env)
    assert result.returncode == 1  # the ECHO seed failed (a 400 is not retried)
    assert teacher.requested.count("e1 ECHO") == 1
    assert "HTTP 400 cannot use the header Bearer *** here" in result.stderr
    assert set(teacher.auth) == {f"Bearer {KEY}"}  # the key was really sent
    files = [path for path in cache.rglob("*") if path.is_file()] + [out]
    assert len(files) == 5
    for text in [path.read_text() for path in files] + [result.stdout, result.stderr]:
        assert KEY not in text


def test_refused_key_stops_the_run(teacher, tmp_path):
    seeds = write_seeds(tmp_path / "seeds.jsonl", SEEDS)
    env = {"GR_TEACHER_BASE_URL": teacher.base_url, "GR_TEACHER_API_KEY": "sk-wrong-key"}
    result = run_cli(
        ["--seeds", str(seeds), "--out", str(tmp_path / "out.jsonl"), "--cache", str(tmp_path / "c"), "--workers", "1"],
        env,
    )
    assert result.returncode == 2
    assert len(teacher.requested) == 1  # no point asking about the other seeds
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {teacher.base_url} refused the request: HTTP 401 Incorrect API key provided: Bearer ***"
    )


@pytest.mark.parametrize(
    "content, env, message",
    [
        (None, {"GR_TEACHER_API_KEY": KEY}, r"error: seeds file \S+seeds.jsonl does not exist$"),
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', {"GR_TEACHER_API_KEY": KEY},
         r"error: \S+seeds.jsonl:2 is not valid JSON \(.+\)$"),
        ('{"prompt": "ok", "request_label": "Harmful"}\n', {"GR_TEACHER_API_KEY": KEY},
         r"error: \S+seeds.jsonl:1: 'request_label' is 'Harmful'; it must be 'harmful', 'unharmful' or null$"),
        ('["prompt"]\n', {"GR_TEACHER_API_KEY": KEY}, r"error: \S+seeds.jsonl:1 is not a JSON object"),
        ('{"prompt": "ok"}\n', {}, r"error: no API key: set GR_TEACHER_API_KEY \(or OPENAI_API_KEY\)$"),
        ('{"prompt": "ok"}\n', {"GR_TEACHER_API_KEY": KEY, "GR_TEACHER_BASE_URL": "localhost:8000"},
         r"error: the teacher base URL must be an http\(s\) URL"),
        ('{"prompt": "ok"}\n', {"GR_TEACHER_API_KEY": KEY, "GR_TEACHER_BASE_URL": "https://me:url-secret@h.example/v1"},
         r"error: the teacher base URL 'https://h.example/v1' must not hold a user name or password"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, content, env, message):
    seeds = tmp_path / "seeds.jsonl"
    if content is not None:
        seeds.write_text(content)
    result = run_cli(["--seeds", str(seeds), "--out", str(tmp_path / "out.jsonl"), "--cache", str(tmp_path)], env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert re.match(message, result.stderr.strip()), result.stderr
    assert "url-secret" not in result.stderr


def test_a_rerun_whose_requests_all_fail_keeps_the_rows_of_the_run_before(teacher, tmp_path):
    seeds = load_seeds(write_seeds(tmp_path / "seeds.jsonl", SEEDS))
    out = tmp_path / "out.jsonl"
    synthesize(seeds, out, base_url=teacher.base_url, api_key=KEY, cache_dir=tmp_path / "cache", backoff=0.001,
               progress=False)
    before = out.read_text()
    assert len(before.splitlines()) == 4
    # A fresh cache and an endpoint that refuses every connection: every seed fails this time.
    summary = synthesize(seeds, out, base_url="http://127.0.0.1:9", api_key=KEY, cache_dir=tmp_path / "fresh",
                         retries=0, timeout=2, progress=False)
    assert summary.failed == 4 and out.read_text() == before


def test_every_reader_of_json_lines_splits_on_newline_only(tmp_path):
    """U+0085, U+2028 and U+2029 inside strings: each reader of the project gets the lines as written."""
    from gr.data import load_data
    from gr.mining import HardSample, load_hard_samples, save_hard_samples

    odd = "one\u0085two\u2028three\u2029four"
    seeds = write_seeds(tmp_path / "seeds.jsonl", [{"prompt": odd, "request_label": "harmful"}] * 2)
    assert [s.prompt for s in load_seeds(seeds)] == [odd, odd]
    rows = [{"instruction": INSTRUCTION, "input": format_input(odd), "output": format_answers("harmful", None, None)}] * 2
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [r["input"] for r in load_data(str(tmp_path / "rows.jsonl"))] == [rows[0]["input"]] * 2
    hard = [HardSample(dict(rows[0], source="x"), "request", odd, odd + "!", 0)]
    save_hard_samples(hard, tmp_path / "hard.jsonl")
    assert load_hard_samples(tmp_path / "hard.jsonl") == hard
