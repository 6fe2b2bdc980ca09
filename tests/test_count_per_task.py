"""The per-task counter (tools/count_per_task.py): its help, and how it reads strace's lines into
calls per file kind. What it counts against a running mesh is in docs/performance.md, not here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "count_per_task.py"
sys.path.insert(0, str(TOOL.parent))

import count_per_task  # noqa: E402

STORE = "/tmp/mesh-count-x/jetstream/$G/streams"
TRACE = f"""\
101 pwrite64(9<{STORE}/MESH_WORK/msgs/1.blk>, ""..., 180, 0) = 180
101 fsync(9<{STORE}/MESH_WORK/msgs/1.blk> <unfinished ...>
102 pwrite64(11<{STORE}/MESH_EVENTS/msgs/1.blk>, ""..., 240, 0) = 240
101 <... fsync resumed>) = 0
102 fsync(11<{STORE}/MESH_EVENTS/msgs/1.blk>) = 0
103 write(14<{STORE}/MESH_WORK/obs/workers-cpu/o.dat>, ""..., 30) = 30
103 write(2<pipe:[123]>, ""..., 50) = 50
104 pwrite64(9<{STORE}/MESH_WORK/msgs/1.blk>, ""..., 40, 180) = 40
"""


def test_help_names_the_options() -> None:
    done = subprocess.run([sys.executable, str(TOOL), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for word in ("--tasks", "--chain", "--durability", "--no-strace", "--json"):
        assert word in done.stdout


def test_strace_lines_become_calls_per_file_kind() -> None:
    calls = count_per_task.parse_strace(TRACE)
    assert calls == {
        "pwrite64": {"MESH_WORK/msgs": 2, "MESH_EVENTS/msgs": 1},
        # an unfinished call is counted once, not again when it resumes
        "fsync": {"MESH_WORK/msgs": 1, "MESH_EVENTS/msgs": 1},
        "write": {"MESH_WORK/obs": 1, "other": 1},
    }
