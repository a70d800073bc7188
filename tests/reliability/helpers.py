"""Shared helpers of the reliability tests: subprocess env, index invariants, tree snapshots,
an inotify rename counter (who wrote which shard, exactly), tmpfs mounts and process kills.

Nothing here mocks the model or Prefect: faults are real (SIGKILL, full or read-only file
systems, flipped bytes); the observers (inotify, sha256, the index) only watch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from lib.store.shards import INDEX_NAME, read_index, verify_record

ROOT = Path(__file__).resolve().parents[2]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test process's env (PREFECT_HOME, HF offline …) plus PYTHONPATH; no server unless given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_API_AUTH_STRING", None)
    env.update(extra)
    return env


def worker_cmd(*args: str) -> list[str]:
    """`python -m tests.reliability.workers …` (see workers.py)."""
    return [sys.executable, "-m", "tests.reliability.workers", *map(str, args)]


def spawn(cmd: list[str], **extra_env: str) -> subprocess.Popen:
    """Start `cmd` in its own process group (so a SIGKILL takes its children too)."""
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(**extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL the process group we started (by its id) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def count_rows(folder: Path) -> int:
    """Complete lines in the index right now (cheap; for polling)."""
    try:
        return (folder / INDEX_NAME).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def index_problems(folder: Path) -> list[str]:
    """What is wrong with a capture folder's index: unreadable, duplicate capture keys or shard
    names, rows whose shard is missing or fails size/sha256. [] = consistent."""
    if not (folder / INDEX_NAME).exists():
        return []
    try:
        rows = read_index(folder)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return [f"index unreadable: {exc.__class__.__name__}: {exc}"]
    out = []
    keys = Counter(r.capture_key for r in rows)
    out += [f"capture key {k[:12]}… indexed {n} times" for k, n in keys.items() if n > 1]
    names = Counter(r.shard for r in rows)
    out += [f"shard {s} indexed {n} times" for s, n in names.items() if n > 1]
    out += [f"dangling row {r.shard}: {why}" for r in rows if (why := verify_record(folder, r))]
    return out


def valid_shards(folder: Path) -> dict[str, str]:
    """shard name -> sha256 of every indexed shard that passes its check."""
    if not (folder / INDEX_NAME).exists():
        return {}
    return {r.shard: r.sha256 for r in read_index(folder) if verify_record(folder, r) is None}


def tree_state(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """path -> (size, mtime_ns, inode) of everything under `roots` (missing roots: nothing)."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            out[str(p)] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, st.st_ino)
    return out


def tree_diff(before: dict, after: dict) -> list[str]:
    changed = [f"new {p}" for p in after.keys() - before.keys()]
    changed += [f"removed {p}" for p in before.keys() - after.keys()]
    changed += [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    return sorted(changed)


# --- inotify: count every rename into a folder ---------------------------------------------------
_IN_MOVED_TO = 0x00000080
_IN_Q_OVERFLOW = 0x00004000
_EVENT = struct.Struct("iIII")


class RenameCounter:
    """Counts renames into `folder` by file name (IN_MOVED_TO). Every shard and index write goes
    temp file → rename, so this counts writes exactly, whichever process made them. Events queue
    in the kernel until `counts()` drains them (up to fs.inotify.max_queued_events)."""

    def __init__(self, folder: Path):
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"inotify unavailable (errno {ctypes.get_errno()}); cannot count writes")
        wd = self._libc.inotify_add_watch(self.fd, str(folder).encode(), _IN_MOVED_TO)
        if wd < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), "inotify_add_watch failed", str(folder))
        self.seen: Counter[str] = Counter()

    def counts(self) -> Counter[str]:
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return self.seen
            pos = 0
            while pos < len(buf):
                _, mask, _, n = _EVENT.unpack_from(buf, pos)
                name = buf[pos + _EVENT.size : pos + _EVENT.size + n].rstrip(b"\0").decode()
                pos += _EVENT.size + n
                if mask & _IN_Q_OVERFLOW:
                    raise AssertionError("inotify queue overflowed; write counts are incomplete")
                self.seen[name] += 1

    def shard_writes(self) -> Counter[str]:
        return Counter({k: v for k, v in self.counts().items() if k.endswith(".safetensors")})

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> RenameCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- tmpfs mounts -------------------------------------------------------------------------------
def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (e.g. '256k') at `path`; skip the test when mounting is not
    possible here (not root / no CAP_SYS_ADMIN). Always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    res = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    res = _mount("-o", f"remount,{options}", str(path))
    assert res.returncode == 0, f"remount {options} failed: {res.stderr}"


class Zygote:
    """Runs worker jobs in children forked from one warm interpreter (workers.py `zygote`), so
    that each killed-and-restarted capture or fold costs its real work, not another torch import.
    One job at a time: `start()` → pid; `finished()`; `kill()` (the zygote SIGKILLs its child by
    pid; an ended child stays a zombie until then, so the pid cannot have been reused); `wait()`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.proc = subprocess.Popen(worker_cmd("zygote"), cwd=ROOT, env=subprocess_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout.readline().strip() == "ready", "zygote failed to start"
        self.n = 0
        self.pid: int | None = None

    def start(self, *argv: object) -> int:
        import json

        self.n += 1
        self.result, self.log = self.folder / f"job{self.n}.out", self.folder / f"job{self.n}.log"
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "result": str(self.result),
                                          "log": str(self.log)}) + "\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "pid"
        self.pid = int(pid)
        return self.pid

    def finished(self) -> bool:
        """True once the child has exited (a zombie: the zygote reaps it only on kill()/wait())."""
        return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"

    def kill(self) -> int:
        """SIGKILL the running child; returns its exit code (-9 when the kill landed, 0 when it had finished).
        Sent from here at once (the window aimed at may last a millisecond): the pid is still ours,
        since the zygote reaps only after reading "kill"."""
        os.kill(self.pid, signal.SIGKILL)
        return self._reap("kill")

    def wait(self) -> int:
        return self._reap("wait")

    def _reap(self, how: str) -> int:
        self.proc.stdin.write(how + "\n")
        self.proc.stdin.flush()
        word, pid, code = self.proc.stdout.readline().split()
        assert word == "exit" and int(pid) == self.pid
        return int(code)

    def output(self) -> str:
        return self.result.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
