"""A GPU worker loads llama.cpp before anything else can load the system's C++ runtime."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mesh.host.preload import is_gpu_worker, preload


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["mesh", "agent", "worker", "--gpu", "0"], True),
        (["mesh", "--server", "nats://h:4222", "agent", "worker", "--classes", "llm", "--gpu=1"], True),
        (["mesh", "agent", "worker", "--gpu", "none"], False),
        (["mesh", "agent", "worker", "--gpu=cpu"], False),
        (["mesh", "agent", "worker"], False),
        (["mesh", "agent", "brain"], False),
        (["mesh", "submit", "--gpu", "0"], False),
        (["pytest", "-q"], False),
    ],
)
def test_which_commands_are_gpu_workers(argv: list[str], expected: bool) -> None:
    assert is_gpu_worker(argv) is expected


def test_preload_imports_llama_cpp_for_a_gpu_worker_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llama_cpp")
    assert preload(["mesh", "agent", "worker", "--gpu", "0"]) == ["llama_cpp"]
    assert preload(["mesh", "agent", "worker", "--gpu", "none"]) == []
    monkeypatch.setenv("MESH_PRELOAD", "0")
    assert preload(["mesh", "agent", "worker", "--gpu", "0"]) == []


def test_a_gpu_worker_process_has_llama_cpp_before_nats() -> None:
    pytest.importorskip("llama_cpp")
    code = (
        "import sys; sys.argv = ['mesh', 'agent', 'worker', '--gpu', '0']\n"
        "import mesh\n"
        "print('llama_cpp' in sys.modules, 'nats' in sys.modules)\n"
        "import mesh.cli\n"
        "names = list(sys.modules)\n"
        "print(names.index('llama_cpp') < names.index('nats'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "True"], out.stderr
