"""The one JSON-lines reader and writer, and replacing files and folders without a moment of loss."""

import os

import pytest

from gr import GRError, files
from gr.files import JsonlAppender, parse_jsonl, read_jsonl, recover_dir, replace_dir, temporary_dir, write_jsonl

# JSON strings may hold these as they are; str.splitlines() would cut a line at each of them.
SEPARATORS = "a\u0085b\u2028c\u2029d"


def test_lines_split_on_newline_only(tmp_path):
    rows = [{"text": SEPARATORS, "n": 1}, {"text": "plain", "n": 2}]
    path = tmp_path / "x.jsonl"
    write_jsonl(path, rows)
    raw = path.read_text(encoding="utf-8")
    assert SEPARATORS in raw and len(raw.splitlines()) > 2  # what the old reader would have split
    assert read_jsonl(path) == rows
    assert parse_jsonl(raw) == [(1, rows[0]), (2, rows[1])]


def test_bad_lines_are_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{oops\n')
    with pytest.raises(GRError, match=r"x.jsonl:3 is not valid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(GRError, match=r"x.jsonl:2 is not a JSON object"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"b": 2')  # cut short by a kill: an error, unless the caller expects it
    with pytest.raises(GRError):
        read_jsonl(path)
    assert read_jsonl(path, partial_ok=True) == [{"a": 1}]
    with pytest.raises(GRError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_appender_flushes_each_line_and_drops_a_cut_one(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\n{"b": 2, "cut')
    with JsonlAppender(path) as appender:
        appender.write({"c": SEPARATORS})
        assert read_jsonl(path) == [{"a": 1}, {"c": SEPARATORS}]  # on disk before the file is closed
    with pytest.raises(GRError, match="cannot write"):
        JsonlAppender(tmp_path / "out.jsonl" / "x.jsonl")


def test_write_text_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        files.write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def folder(path, **entries):
    path.mkdir()
    for name, text in entries.items():
        (path / name).write_text(text)
    return path


def test_replace_dir_swaps_in_one_step_and_keeps_what_it_is_told(tmp_path, monkeypatch):
    """With an atomic exchange there is no rename at all: no moment without a folder at the destination."""
    if not files._exchange(folder(tmp_path / "a"), folder(tmp_path / "b")):
        pytest.skip("this filesystem cannot exchange two paths in one step")
    dest = folder(tmp_path / "run", **{"model.safetensors": "old", "train_log.jsonl": "log"})
    tmp = folder(temporary_dir(dest), **{"model.safetensors": "new"})

    def no_rename(a, b):
        raise AssertionError("a rename would leave a moment with no folder at the destination")

    monkeypatch.setattr(os, "rename", no_rename)
    replace_dir(tmp, dest, keep=lambda name: name == "train_log.jsonl")
    assert (dest / "model.safetensors").read_text() == "new" and (dest / "train_log.jsonl").read_text() == "log"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "run"]


def test_exchange_swaps_in_one_step(tmp_path):
    a, b = folder(tmp_path / "a", x="a"), folder(tmp_path / "b", x="b")
    if not files._exchange(a, b):
        pytest.skip("this filesystem cannot exchange two paths in one step")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_kill_between_two_renames_loses_nothing(tmp_path, monkeypatch):
    """Where the filesystem cannot exchange, the old folder is renamed away, then the new one in; a kill
    between the two leaves the new folder complete under its temporary name, and recovery puts it back."""
    dest = folder(tmp_path / "checkpoint", state="step 4")
    tmp = folder(temporary_dir(dest), state="step 6")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def killed_after_first(a, b):
        if calls:
            raise KeyboardInterrupt
        calls.append(a)
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(tmp, dest)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not dest.exists() and (tmp / "state").read_text() == "step 6"
    step = lambda p: int((p / "state").read_text().split()[1])  # noqa: E731
    assert recover_dir(dest, order=step) == dest
    assert (dest / "state").read_text() == "step 6" and sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_recover_dir_prefers_the_latest_complete_version(tmp_path):
    dest = folder(tmp_path / "checkpoint", state="step 8", done="")
    folder(temporary_dir(dest), state="step 6", done="")  # the old version, left by a kill after the swap
    complete = lambda p: (p / "done").exists()  # noqa: E731
    step = lambda p: int((p / "state").read_text().split()[1])  # noqa: E731
    assert recover_dir(dest, complete, step) == dest and (dest / "state").read_text() == "step 8"
    assert not temporary_dir(dest).exists()
    folder(temporary_dir(dest), state="step 10")  # incomplete: a kill while it was being written
    assert recover_dir(dest, complete, step) == dest and (dest / "state").read_text() == "step 8"
    assert recover_dir(tmp_path / "nothing", complete, step) is None


def test_out_dir_checks(tmp_path):
    for bad in (".", "..", "/"):
        with pytest.raises(GRError, match="names no folder of its own"):
            files.check_out_dir(bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(GRError, match="is a file, not a folder"):
        files.check_out_dir(tmp_path / "file")
    assert files.check_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    with pytest.raises(GRError, match="is a folder"):
        files.check_writable(tmp_path)


def test_cache_dir_honours_gr_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("GR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_dir() == tmp_path / "xdg" / "gr"
    monkeypatch.setenv("GR_CACHE", str(tmp_path / "mine"))
    assert files.cache_dir() == tmp_path / "mine"
