"""What `mesh up` says of an agent that exits: the end of its log, not only its exit code."""

from __future__ import annotations

from pathlib import Path

from mesh.ops.up import _last_words


def test_an_exited_agents_last_words_come_from_its_log(tmp_path: Path) -> None:
    log = tmp_path / "gpu-99.log"
    log.write_text(
        "INFO worker starting\n"
        + "x" * 10_000
        + "\nError: cannot read GPU 99 through NVML (NVML Shared Library Not Found): is the \n"
        "NVIDIA driver installed and loaded? Use --gpu none for a CPU worker\n\n"
    )
    said = _last_words(log)
    # the message as the console wrapped it, joined again
    assert said.endswith(
        "cannot read GPU 99 through NVML (NVML Shared Library Not Found): is the NVIDIA "
        "driver installed and loaded? Use --gpu none for a CPU worker"
    )
    assert len(said) <= 300
    assert _last_words(None) == "" and _last_words(tmp_path / "none.log") == ""
    (tmp_path / "empty.log").write_text("")
    assert _last_words(tmp_path / "empty.log") == ""
