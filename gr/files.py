"""Files: the one JSON-lines reader and writer, and replacing files and folders so that nothing is lost.

JSON lines are split on "\\n" only. `str.splitlines()` also splits on U+0085, U+2028 and U+2029, which a
JSON string may hold as they are (`json.dumps(..., ensure_ascii=False)` writes them unescaped), so it would
cut such a line in two.

A file or folder is written under a temporary name beside its destination, then swapped in by one rename:
at every moment the destination holds the old version or the new one, never neither, never half of one.
Results that take long to make are appended line by line (`JsonlAppender`) and flushed, so a killed run
keeps every line it finished; a reader skips the one line a kill can leave cut short.
"""

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from gr import GRError


def cache_dir() -> Path:
    """Where gr keeps what it downloads or computes once: $GR_CACHE, else $XDG_CACHE_HOME/gr, else ~/.cache/gr."""
    if os.environ.get("GR_CACHE"):
        return Path(os.environ["GR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gr"


def parse_jsonl(text: str, origin: str = "", partial_ok: bool = False) -> list[tuple[int, object]]:
    """(line number, value) of each line of JSON-lines text, blank lines skipped. A line that is not JSON
    is an error naming `origin` and the line, except, with `partial_ok`, a last line without its newline
    (cut short by a kill)."""
    lines = text.split("\n")
    values = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            if partial_ok and n == len(lines):
                break
            raise GRError(f"{origin}:{n} is not valid JSON ({e.msg})") from None
    return values


def read_jsonl_lines(path, partial_ok: bool = False) -> list[tuple[int, dict]]:
    """(line number, JSON object) of each line of a JSON-lines file; a line that is not an object is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GRError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GRError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    values = parse_jsonl(text, str(path), partial_ok)
    for n, value in values:
        if not isinstance(value, dict):
            raise GRError(f"{path}:{n} is not a JSON object")
    return values


def read_jsonl(path, partial_ok: bool = False) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per line (see parse_jsonl)."""
    return [value for _, value in read_jsonl_lines(path, partial_ok)]


def dumps(value) -> str:
    """One JSON line (without its newline); non-ASCII text is written as it is."""
    return json.dumps(value, ensure_ascii=False)


def write_text(path, text: str) -> None:
    """Write a whole file atomically: a temporary file in the same folder, renamed over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise GRError(f"cannot write {path}: {e.strerror or e}") from None


def write_jsonl(path, rows) -> None:
    """A whole JSON-lines file, written atomically."""
    write_text(path, "".join(dumps(row) + "\n" for row in rows))


class JsonlAppender:
    """Append JSON lines to a file as results are made, each flushed to disk at once.

    Opening checks that the file can be written (before any long work starts) and drops the one line a
    killed run can leave unfinished, so the file stays valid JSON lines.
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a+b")
            size = self.file.seek(0, os.SEEK_END)
            if size:
                self.file.seek(size - 1)
                if self.file.read(1) != b"\n":  # a line cut short by a kill
                    self.file.seek(0)
                    self.file.truncate(self.file.read().rfind(b"\n") + 1)
        except OSError as e:
            raise GRError(f"cannot write {path}: {e.strerror or e}") from None

    def write(self, row) -> None:
        self.file.write((dumps(row) + "\n").encode("utf-8"))
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_writable(path) -> None:
    """Fail now, with one line, if a file cannot be written at `path` (not when the results are ready)."""
    path = Path(path)
    if path.is_dir():
        raise GRError(f"{path} is a folder, not a file")
    existing = path.resolve().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GRError(f"cannot write {path}: {existing} is a file")
    if not os.access(existing, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise GRError(f"cannot write {path}: permission denied")


def check_out_dir(path) -> Path:
    """An output folder must be a folder with a name of its own (not '.' or '..') that can be written."""
    path = Path(path)
    resolved = path.resolve()
    if path.name in ("", ".", "..") or resolved == resolved.parent:
        raise GRError(f"--out {path} names no folder of its own: give a new or existing folder, e.g. out/run")
    if path.exists() and not path.is_dir():
        raise GRError(f"--out {path} is a file, not a folder")
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GRError(f"--out {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise GRError(f"--out {path} cannot be written: permission denied")
    return path


_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def temporary_dir(dest) -> Path:
    """The temporary name a new version of the folder `dest` is written under before it is swapped in."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.tmp")


def replace_dir(tmp, dest, keep=lambda name: False) -> None:
    """Swap the finished folder `tmp` in as `dest`, atomically, then delete the old version.

    Entries of the old folder for which `keep(name)` is true and that `tmp` lacks (a run's log, its
    resume checkpoint) are hard-linked into `tmp` first, so they stay at `dest` throughout. Where the
    filesystem cannot swap two folders in one step, the old folder is renamed to `tmp`'s name and the new
    one in; a kill between the two leaves the new version complete under `tmp`'s name, where
    `recover_dir` finds it.
    """
    tmp, dest = Path(tmp), Path(dest)
    if not dest.exists():
        os.rename(tmp, dest)
        return
    for entry in dest.iterdir():
        if keep(entry.name) and not (tmp / entry.name).exists():
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, copy_function=os.link)
            else:
                os.link(entry, tmp / entry.name)
    if not _exchange(tmp, dest):
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
        os.rename(tmp, dest)
        tmp = old
    shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(dest, complete=lambda folder: True, order=lambda folder: 0) -> Path | None:
    """`dest` after a kill: of `dest` and the versions a killed `replace_dir` can leave under the temporary
    names, the complete one that is latest by `order` is swapped in as `dest` and the others are deleted.
    Returns `dest`, or None when no complete version exists."""
    dest = Path(dest)
    versions = [p for p in (dest, temporary_dir(dest), dest.with_name(f".{dest.name}.old")) if p.is_dir()]
    good = [p for p in versions if complete(p)]
    if not good:
        return None
    best = max(good, key=order)
    if best != dest:
        replace_dir(best, dest)
    for p in versions:
        if p != best and p != dest:
            shutil.rmtree(p, ignore_errors=True)
    return dest
