"""Another host on this machine, for tests: a worker that shares no filesystem path (and, where
it can, no network namespace) with the host that submits the plans.

`two_hosts` makes the pair (the `two_hosts` fixture of tests/conftest.py uses it):

- the **network**: run as root with `ip`, a network namespace and a veth pair on a /30 of
  10.231.0.0/16 picked at random and checked free (so parallel runs do not clash); the
  nats-server listens on the host's end of the pair, the other host's processes run inside the
  namespace and reach it there. Without root or `ip` (or when making it fails) both hosts share
  this machine's network and the server listens on the loopback; `Network.mode` says which
  (`netns` or `shared`), and the fixture prints it;
- the **files**: the other host has its own HOME, XDG_DATA_HOME, XDG_CONFIG_HOME,
  XDG_CACHE_HOME and TMPDIR under a directory of its own, its own `MESH_HOST_ID`, and a cwd
  that is neither the repository nor the plan's directory. As root, its processes also run in
  a mount and UTS namespace of their own (`unshare`), where the directory holding the test's
  directories is covered by an empty tmpfs (`OtherHost.hidden`), so the submitting host's
  paths do not exist there, and the host name is its host id; `OtherHost.isolated` says
  whether that worked.

`MESH_TESTS_NO_NAMESPACES=1` in the environment runs the tests the way a machine without root
would (a shared network, distinct directories only).

Everything is taken down at the end, however the test ended: the other host's processes, the
veth pair, the namespace, the other host's directory, and namespaces a crashed earlier run left
behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.ops.embedded import EmbeddedServer

if TYPE_CHECKING:
    from tests.conftest import Mesh

ROOT = Path(__file__).resolve().parent.parent
SUBNET = ipaddress.ip_network("10.231.0.0/16")
NS_PREFIX = "mesh-t"
NO_NAMESPACES = "MESH_TESTS_NO_NAMESPACES"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def can_namespace() -> str:
    """'' when this process can make network namespaces, else why not."""
    if os.environ.get(NO_NAMESPACES):
        return f"{NO_NAMESPACES} is set"
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no `ip` command"
    return ""


@dataclass
class Network:
    """Where the two hosts meet: `server_host` is the address the server listens on and every
    process connects to; `prefix` runs a command on the other host's side."""

    mode: str  # "netns" or "shared"
    server_host: str = "127.0.0.1"
    other_addr: str = "127.0.0.1"
    namespace: str = ""
    why_shared: str = ""
    # the host's end of the veth pair
    link: str = ""

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    def close(self) -> None:
        # deleting one end of a veth pair deletes both; the namespace would take its end with it
        # too, but later (the kernel frees a namespace in the background)
        if self.link:
            _ip("link", "del", self.link, check=False)
            self.link = ""
        if self.namespace:
            _ip("netns", "del", self.namespace, check=False)
            self.namespace = ""


def _used_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = _ip("-o", "addr", "show", check=False).stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


def sweep_stale_namespaces() -> None:
    """Remove the namespaces of earlier runs whose process is gone (a run killed mid-test)."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(NS_PREFIX):
            continue
        pid = name[len(NS_PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name, check=False)


def make_network() -> Network:
    """A namespace joined to this one by a veth pair on a free /30; a shared network when that
    cannot be made (and why)."""
    why = can_namespace()
    if why:
        return Network("shared", why_shared=why)
    sweep_stale_namespaces()
    tag = secrets.token_hex(3)
    ns = f"{NS_PREFIX}{os.getpid()}-{tag}"
    outer, inner = f"mh{tag}", f"mn{tag}"
    used = _used_networks()
    subnets = list(SUBNET.subnets(new_prefix=30))
    for _ in range(50):
        net = random.choice(subnets)
        if not any(net.overlaps(u) for u in used):
            break
    else:
        return Network("shared", why_shared="no free /30 in 10.231.0.0/16")
    host_addr, other_addr = (str(a) for a in list(net.hosts())[:2])
    network = Network("netns", host_addr, other_addr, ns)
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        network.link = outer
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{host_addr}/30", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", ns, "addr", "add", f"{other_addr}/30", "dev", inner)
        _ip("-n", ns, "link", "set", inner, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        network.close()
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        return Network("shared", why_shared=f"making the namespace failed: {detail}")
    return network


# runs in the other host's own mount and UTS namespaces: its host name, and an empty tmpfs over
# each of the submitting host's directories; then the command
_ISOLATE = """set -e
hostname "$1"; shift
while [ "$1" != "--" ]; do
  if [ -d "$1" ]; then mount -t tmpfs -o size=64k,mode=0755 mesh-other-host "$1"; fi
  shift
done
shift
exec "$@"
"""


@dataclass
class OtherHost:
    """The other host: its processes see only its own directories (and the code)."""

    mesh: Mesh
    root: Path
    host_id: str
    network: Network
    # the submitting host's directories, covered on this host when `isolated`
    hidden: list[Path] = field(default_factory=list)
    isolated: bool = False
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for d in ("home", "data", "config", "cache", "tmp", "cwd"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in self.mesh.env.items() if not k.startswith(("XDG_", "MESH_"))}
        keep.update({k: v for k, v in self.mesh.env.items() if k.startswith("MESH_")})
        self.env = {
            **keep,
            "HOME": str(self.root / "home"),
            "XDG_DATA_HOME": str(self.root / "data"),
            "XDG_CONFIG_HOME": str(self.root / "config"),
            "XDG_CACHE_HOME": str(self.root / "cache"),
            "TMPDIR": str(self.root / "tmp"),
            "MESH_HOST_ID": self.host_id,
            "MESH_NATS_URL": self.mesh.server.url,
            # its cwd is not the repository: the code comes from here
            "PYTHONPATH": str(ROOT),
        }
        self.isolated = not can_namespace() and shutil.which("unshare") is not None

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def data_dir(self) -> Path:
        return self.root / "data" / "mesh"

    @property
    def mode(self) -> str:
        """How separate the other host is, in words (for the test's output)."""
        net = "own network namespace" if self.network.mode == "netns" else "shared network"
        if self.network.why_shared:
            net += f" ({self.network.why_shared})"
        files = "own mount namespace (submitter's dirs hidden)" if self.isolated else "own directories"
        return f"{net}, {files}"

    def may_hide(self, path: Path) -> bool:
        """Whether covering `path` leaves the other host what it needs: the code, Python and
        its own directory."""
        needed = [ROOT, Path(sys.prefix), Path(sys.executable).resolve(), self.root]
        return path.is_dir() and not any(n.is_relative_to(path) for n in needed)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as the other host runs it."""
        wrap: list[str] = []
        if self.isolated:
            hidden = [str(p) for p in self.hidden if self.may_hide(p)]
            wrap = ["unshare", "--mount", "--uts", "--propagation", "private"]
            wrap += ["sh", "-c", _ISOLATE, "isolate", self.host_id, *hidden, "--"]
        return [*self.network.prefix, *wrap, *argv]

    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv),
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def sees(self, path: Path) -> bool:
        """Whether `path` exists on the other host."""
        return self.run(["test", "-e", str(path)]).returncode == 0

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The `mesh` command run on the other host (it may fail: the caller looks)."""
        return self.run([sys.executable, "-m", "mesh", *args], timeout=timeout)

    def start_agent(self, name: str, role: str, *args: str) -> subprocess.Popen[bytes]:
        """An agent process on the other host, known to the test's `Mesh` like its own (its
        log, its death noticed by `wait_plan`, stopped by `stop_all`)."""
        log_path = self.mesh.tmp / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.mesh.logs[name] = log_path
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                self.command([sys.executable, "-m", "mesh", "agent", role, *args]),
                env=self.env,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.cwd,
            )
        self.mesh.procs[name] = proc
        return proc

    def worker(self, name: str = "other-worker", slots: int = 2, *args: str) -> subprocess.Popen[bytes]:
        return self.start_agent(name, "worker", "--slots", str(slots), *args)


@contextlib.contextmanager
def network() -> Iterator[Network]:
    net = make_network()
    try:
        yield net
    finally:
        net.close()


@contextlib.asynccontextmanager
async def two_hosts(tmp: Path) -> AsyncIterator[tuple[Mesh, OtherHost]]:
    """A mesh whose server the other host reaches over the network between them: the test's
    own host (its `Mesh`, whose directories are under `tmp`) and the other host (under a
    directory of its own outside `tmp`'s parent, removed at the end).

    The other host cannot see `tmp`'s parent (where pytest keeps every test's directory), so
    the submitting host's directories do not exist there at all (an empty directory at the
    same path would still be found); where that parent holds something it needs, `tmp` alone
    is covered."""
    from tests.conftest import Mesh

    other_root = Path(tempfile.mkdtemp(prefix="mesh-other-host-"))
    try:
        with network() as net:
            server = EmbeddedServer(tmp / "nats", port=-1, durability="lazy", host=net.server_host)
            server.start()
            mesh = Mesh(server, tmp)
            try:
                other = OtherHost(mesh, other_root, f"other-{secrets.token_hex(3)}", net)
                other.hidden = [tmp.parent] if other.may_hide(tmp.parent) else [tmp]
                print(f"the other host {other.host_id}: {other.mode}")
                yield mesh, other
            finally:
                try:
                    await mesh.close()
                finally:
                    mesh.stop_all()
                    server.stop()
    finally:
        shutil.rmtree(other_root, ignore_errors=True)
