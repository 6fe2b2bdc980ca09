"""The publish benchmark (tools/publish_rate.py) runs end to end on a tiny batch and prints its
two figures; the figures themselves belong to docs/performance.md, not to a test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def test_it_measures_both_ways() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "publish_rate.py"),
            "--batch",
            "5",
            "--batches",
            "2",
            "--rounds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    for way in ("publish", "publish_many"):
        line = re.search(
            rf"^{way} +median ([0-9.]+) µs of CPU a message \(([0-9.]+), ([0-9.]+)\)$", done.stdout, re.M
        )
        assert line is not None, done.stdout
        assert float(line.group(1)) > 0
