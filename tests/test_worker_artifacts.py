"""Which files of an attempt's directory are its artifacts."""

from __future__ import annotations

from pathlib import Path

from agents.worker_artifacts import artifact_files


def test_links_that_lead_out_of_the_directory_are_not_artifacts(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the task's")
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out" / "made.txt").write_text("the task's")
    (work / "out" / "a.txt").symlink_to(outside / "secret.txt")
    (work / "linkdir").symlink_to(outside)
    # a link that stays inside is the file it names
    (work / "out" / "same.txt").symlink_to(work / "out" / "made.txt")
    found = artifact_files(
        str(work), ("out/*.txt", "linkdir/*", "**/*.txt"), ["linkdir/secret.txt", "out/a.txt"]
    )
    assert sorted(found) == ["out/made.txt", "out/same.txt"]
