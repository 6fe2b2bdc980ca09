"""The peers' benchmark (tools/peers/run.py) starts without the peers installed: its help, and its
word on what is missing. Timings live in the benchmark, never here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "tools" / "peers" / "run.py"


def test_help_names_the_scenarios_and_options() -> None:
    done = subprocess.run([sys.executable, str(RUN), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for word in ("throughput", "chain", "--redis", "--rounds", "--json"):
        assert word in done.stdout


def test_what_is_missing_is_named_with_its_install_command() -> None:
    # PATH without redis-server and the peer libraries hidden: the script says what to install
    code = (
        "import sys, importlib.util, shutil; sys.argv = ['run.py', '--no-mesh', '--rounds', '1'];"
        "real = importlib.util.find_spec;"
        "hidden = ('celery', 'dramatiq', 'arq');"
        "importlib.util.find_spec = lambda n, *a: None if n in hidden else real(n, *a);"
        "shutil.which = lambda n, *a: None;"
        f"sys.path.insert(0, {str(RUN.parent)!r}); import run; sys.exit(run.main())"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "apt-get install -y redis-server" in done.stderr
    assert "celery, dramatiq, arq" in done.stderr
    assert "arq==" in done.stderr and "make peers" in done.stderr
