"""A small FUSE filesystem that forgets, on a "power cut", everything not yet synced.

The pull-the-plug tests (tests/test_power_cut.py) run nats-server's store on it. It keeps
everything in memory, in two images:

- file data: each file has its live bytes (what reads see) and its synced bytes. `fsync` or
  `fdatasync` of the file, or a write through a descriptor opened with `O_SYNC`/`O_DSYNC`,
  copies the live bytes to the synced ones. Closing a file syncs nothing.
- the names (create, mkdir, rename, unlink, rmdir): a journal, as on ext4 or XFS. A change of
  names is durable once any sync happens after it — of that file, another file or a
  directory (`fsync` of a directory) — and every change before a sync commits with it, in
  order. That is kinder than POSIX asks (there only an `fsync` of the directory makes a new
  name durable) and what the common Linux filesystems do.

A power cut (writing `cut` to the control file `/.plugfs` at the root of the mount) puts the
names back as of the last commit and every file's data back to its synced bytes; a file
created since is gone, one removed since is back. The processes that used the store must be
dead by then (SIGKILL): what the filesystem answered them before the cut is all they wrote.
Reading the control file gives counters as JSON.

It is mounted single-threaded, with `direct_io` and no attribute or entry caching, so the
kernel keeps no copy of data or names that could outlive a cut.

    python -m tests.plugfs MOUNTPOINT      # foreground; `fusermount3 -u MOUNTPOINT` stops it

`PlugFS` starts and stops one from a test.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTROL = "/.plugfs"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(eq=False)
class Node:
    mode: int
    data: bytearray = field(default_factory=bytearray)
    synced: bytearray = field(default_factory=bytearray)
    # the live bytes from `dirty_from` on may differ from the synced ones (len(data): none)
    dirty_from: int = 0
    entries: dict[str, Node] = field(default_factory=dict)
    mtime_ns: int = field(default_factory=time.time_ns)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def write(self, buf: bytes, offset: int) -> None:
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset : offset + len(buf)] = buf
        self.dirty_from = min(self.dirty_from, offset)
        self.mtime_ns = time.time_ns()

    def truncate(self, length: int) -> None:
        if length < len(self.data):
            del self.data[length:]
        else:
            self.data.extend(bytes(length - len(self.data)))
        self.dirty_from = min(self.dirty_from, length)
        self.mtime_ns = time.time_ns()

    @property
    def dirty(self) -> bool:
        return self.dirty_from < len(self.data) or len(self.synced) != len(self.data)

    def sync(self) -> None:
        start = self.dirty_from
        del self.synced[start:]
        self.synced += self.data[start:]
        self.dirty_from = len(self.data)

    def lose_unsynced(self) -> int:
        """Back to the synced bytes; returns how many bytes differed or were dropped."""
        lost = len(self.data) - self.dirty_from if self.dirty else 0
        self.data = bytearray(self.synced)
        self.dirty_from = len(self.data)
        return lost


def _walk(node: Node, path: str) -> dict[str, Node]:
    out = {path: node}
    for name, child in node.entries.items():
        out.update(_walk(child, f"{path.rstrip('/')}/{name}"))
    return out


class PlugFSError(RuntimeError):
    pass


def _error(code: int) -> OSError:
    from mfusepy import FuseOSError

    return FuseOSError(code)


class Filesystem:
    """The in-memory tree and the operations FUSE calls (path based; open files by handle)."""

    use_ns = True

    def __init__(self) -> None:
        self.root = Node(stat.S_IFDIR | 0o755)
        self.durable: dict[str, Node] = {"/": self.root}
        self.names_dirty = False
        self.handles: dict[int, tuple[Node, bool]] = {}
        self.next_fh = 10
        self.counters = {"fsync": 0, "fsyncdir": 0, "sync_writes": 0, "writes": 0, "commits": 0, "cuts": 0}
        self.last_cut: dict[str, Any] = {}

    # tree -------------------------------------------------------------------
    def lookup(self, path: str) -> Node:
        node = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if not node.is_dir or part not in node.entries:
                raise _error(errno.ENOENT)
            node = node.entries[part]
        return node

    def parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self.lookup(head or "/")
        if not parent.is_dir:
            raise _error(errno.ENOTDIR)
        return parent, name

    def changed_names(self) -> None:
        self.names_dirty = True

    def commit(self) -> None:
        """A sync: the journal commits every change of names made before it."""
        if self.names_dirty:
            self.durable = _walk(self.root, "/")
            self.names_dirty = False
            self.counters["commits"] += 1

    def cut(self) -> None:
        """The power goes: names back to the last commit, data back to what was synced."""
        live = _walk(self.root, "/")
        kept = {id(n) for n in self.durable.values()}
        lost_files = sorted(p for p, n in live.items() if id(n) not in kept and not n.is_dir)
        back = sorted(p for p in self.durable if p not in live)
        lost_bytes = 0
        for node in {id(n): n for n in [*live.values(), *self.durable.values()]}.values():
            node.entries = {}
            if not node.is_dir:
                lost_bytes += node.lose_unsynced()
        for path in sorted(self.durable, key=lambda p: p.count("/")):
            if path != "/":
                head, _, name = path.rpartition("/")
                self.durable[head or "/"].entries[name] = self.durable[path]
        self.root = self.durable["/"]
        self.names_dirty = False
        self.handles.clear()
        self.counters["cuts"] += 1
        self.last_cut = {
            "files_lost": len(lost_files),
            "names_back": len(back),
            "bytes_lost": lost_bytes,
            "some_files_lost": lost_files[:3],
        }

    def status(self) -> bytes:
        live = _walk(self.root, "/")
        dirty = [n for n in live.values() if not n.is_dir and n.dirty]
        return (
            json.dumps(
                {
                    **self.counters,
                    "files": sum(not n.is_dir for n in live.values()),
                    "dirty_files": len(dirty),
                    "names_dirty": self.names_dirty,
                    "last_cut": self.last_cut,
                }
            ).encode()
            + b"\n"
        )

    # FUSE operations ----------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path == CONTROL:
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": 1 << 16}
        node = self._node(path, fh)
        now = node.mtime_ns
        return {
            "st_mode": node.mode,
            "st_nlink": 2 if node.is_dir else 1,
            "st_size": 4096 if node.is_dir else len(node.data),
            "st_uid": os.getuid(),
            "st_gid": os.getgid(),
            "st_mtime": now,
            "st_ctime": now,
            "st_atime": now,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        node = self.lookup(path)
        if not node.is_dir:
            raise _error(errno.ENOTDIR)
        return [".", "..", *node.entries]

    def mkdir(self, path: str, mode: int) -> int:
        parent, name = self.parent(path)
        if name in parent.entries:
            raise _error(errno.EEXIST)
        parent.entries[name] = Node(stat.S_IFDIR | (mode & 0o7777))
        self.changed_names()
        return 0

    def rmdir(self, path: str) -> int:
        parent, name = self.parent(path)
        node = self.lookup(path)
        if not node.is_dir:
            raise _error(errno.ENOTDIR)
        if node.entries:
            raise _error(errno.ENOTEMPTY)
        del parent.entries[name]
        self.changed_names()
        return 0

    def unlink(self, path: str) -> int:
        parent, name = self.parent(path)
        node = self.lookup(path)
        if node.is_dir:
            raise _error(errno.EISDIR)
        del parent.entries[name]
        self.changed_names()
        return 0

    def rename(self, old: str, new: str) -> int:
        old_parent, old_name = self.parent(old)
        node = self.lookup(old)
        new_parent, new_name = self.parent(new)
        target = new_parent.entries.get(new_name)
        if target is not None and target.is_dir and target.entries:
            raise _error(errno.ENOTEMPTY)
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = node
        self.changed_names()
        return 0

    def chmod(self, path: str, mode: int) -> int:
        node = self.lookup(path)
        node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        return 0

    def _handle(self, node: Node, flags: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = (node, bool(flags & os.O_DSYNC))
        return fh

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        parent, name = self.parent(path)
        node = parent.entries.get(name)
        if node is None:
            node = parent.entries[name] = Node(stat.S_IFREG | (mode & 0o7777))
            self.changed_names()
        return self._handle(node, flags)

    def open(self, path: str, flags: int) -> int:
        if path == CONTROL:
            return 1
        node = self.lookup(path)
        if node.is_dir:
            raise _error(errno.EISDIR)
        return self._handle(node, flags)

    def _node(self, path: str | None, fh: int | None) -> Node:
        if fh is not None and fh in self.handles:
            return self.handles[fh][0]
        if path is None:
            raise _error(errno.EBADF)
        return self.lookup(path)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if fh == 1:
            return self.status()[offset : offset + size]
        node = self._node(path, fh)
        return bytes(node.data[offset : offset + size])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if fh == 1:
            command = data.decode(errors="replace").strip()
            if command != "cut":
                raise _error(errno.EINVAL)
            self.cut()
            return len(data)
        node, sync = self.handles.get(fh) or (self._node(path, None), False)
        node.write(data, offset)
        self.counters["writes"] += 1
        if sync:
            self.counters["sync_writes"] += 1
            node.sync()
            self.commit()
        return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        if path == CONTROL:
            return 0
        self._node(path, fh).truncate(length)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        if fh == 1:
            return 0
        self.counters["fsync"] += 1
        self._node(path, fh).sync()
        self.commit()
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        self.counters["fsyncdir"] += 1
        self.commit()
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        self.handles.pop(fh, None)
        return 0

    def opendir(self, path: str) -> int:
        self.lookup(path)
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def access(self, path: str, amode: int) -> int:
        if path != CONTROL:
            self.lookup(path)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        # JetStream sizes its storage limit from the free space: 16 GiB, of which nothing is used
        blocks = 4 * 1024 * 1024
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": blocks,
            "f_bfree": blocks,
            "f_bavail": blocks,
            "f_files": 1 << 20,
            "f_ffree": 1 << 20,
            "f_favail": 1 << 20,
            "f_namemax": 255,
        }


def mount(mountpoint: str) -> None:
    """Serve a fresh filesystem at `mountpoint` until it is unmounted."""
    import mfusepy

    class Operations(Filesystem, mfusepy.Operations):
        pass

    mfusepy.FUSE(
        Operations(),
        mountpoint,
        foreground=True,
        nothreads=True,
        direct_io=True,
        hard_remove=True,
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
        fsname="plugfs",
    )


class PlugFS:
    """A plugfs process serving `mountpoint` (a test's handle on it)."""

    def __init__(self, mountpoint: Path, log_path: Path) -> None:
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing() -> str:
        """Why a FUSE filesystem cannot be mounted here ('' when it can)."""
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        if not (shutil.which("fusermount3") or shutil.which("fusermount")):
            return "no fusermount3 (Debian package fuse3; `make system-deps` installs it)"
        try:
            import mfusepy  # noqa: F401
        except (ImportError, OSError) as exc:
            return f"mfusepy cannot load libfuse ({exc}); install the fuse3 package and the test extra"
        return ""

    @property
    def control(self) -> Path:
        return self.mountpoint / CONTROL.lstrip("/")

    def start(self, timeout_s: float = 20.0) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.plugfs", str(self.mountpoint)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PlugFSError(f"plugfs did not mount {self.mountpoint}:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def cut(self) -> dict[str, Any]:
        """Power cut: drop everything not synced; returns the counters (with what was lost)."""
        fd = os.open(self.control, os.O_WRONLY)
        try:
            os.write(fd, b"cut\n")
        finally:
            os.close(fd)
        return self.status()

    def status(self) -> dict[str, Any]:
        fd = os.open(self.control, os.O_RDONLY)
        try:
            text = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        result: dict[str, Any] = json.loads(text)
        return result

    def stop(self) -> None:
        tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
        if os.path.ismount(self.mountpoint):
            subprocess.run([tool, "-u", "-z", str(self.mountpoint)], check=False, capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.plugfs MOUNTPOINT")
    with contextlib.suppress(KeyboardInterrupt):
        mount(sys.argv[1])
