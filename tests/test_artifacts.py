"""A task's artifacts through the object store, end to end: a real nats-server, a real brain and
real worker processes. The files a task declares (`- artifacts:`) are stored under the attempt
and listed with size and checksum in its `run.finished`; a dependent run by a worker on "another
host" (its own host id, data dir and home) gets them in its working directory from the store;
too many bytes fail the attempt; an archived plan's objects are deleted.
"""

from __future__ import annotations

import hashlib
import signal

import nats.js.errors
import pytest

from mesh.bus.files import artifact_name, artifact_prefix, put_bytes
from mesh.events import RunFinished
from mesh.work import output_prefix
from tests.conftest import HANG_S, Mesh
from tests.faults import log_count, until

pytestmark = pytest.mark.integration

FENCE = "```"


def task(tid: str, body: str, *fields: str) -> str:
    return "\n".join([f"### {tid}", *fields, "", f"{FENCE}shell", body, FENCE, ""])


def plan(*tasks: str) -> str:
    return "\n".join(["# Artifacts", "", "## Tasks", "", *tasks])


async def finished(mesh: Mesh, plan_id: str, task_id: str) -> RunFinished:
    names = (await mesh.bus()).names
    ends = [m for _, m in await mesh.history(names.run_events(plan_id)) if isinstance(m, RunFinished)]
    mine = [e for e in ends if e.task_id == task_id]
    assert mine, f"no run.finished of {task_id}"
    return mine[-1]


async def object_bytes(mesh: Mesh, name: str) -> bytes:
    obj = await (await (await mesh.bus()).objects()).get(name)
    return obj.data or b""


async def object_names(mesh: Mesh, prefix: str) -> list[str]:
    store = await (await mesh.bus()).objects()
    try:
        infos = await store.list(ignore_deletes=True)
    except nats.js.errors.NotFoundError:  # an empty store
        return []
    return sorted(i.name for i in infos if i.name.startswith(prefix))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def other_host(mesh: Mesh, name: str, *args: str) -> None:
    """A worker as if on another host: its own host id, data dir, home and model cache."""
    home = mesh.tmp / f"host-{name}"
    saved = mesh.env
    mesh.env = {
        **saved,
        "MESH_HOST_ID": f"host-{name}",
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
    }
    try:
        mesh.worker(name, 1, *args)
    finally:
        mesh.env = saved


async def test_declared_files_are_stored_under_the_attempt_with_size_and_checksum(mesh: Mesh) -> None:
    mesh.brain()
    mesh.worker()
    body = "mkdir -p out/deep && printf 'one\\n' > out/a.txt && printf 'two two\\n' > out/b.txt\n"
    body += "printf 'not kept' > out/c.log && printf 'deep' > out/deep/d.txt"
    plan_id = await mesh.submit_text(plan(task("make", body, "- artifacts: out/*.txt, out/**/d.txt")))
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    run = await finished(mesh, plan_id, "make")
    by_path = {f.path: f for f in run.files}
    assert sorted(by_path) == ["out/a.txt", "out/b.txt", "out/deep/d.txt"]
    for rel, data in (("out/a.txt", b"one\n"), ("out/b.txt", b"two two\n"), ("out/deep/d.txt", b"deep")):
        ref = by_path[rel]
        assert (ref.size, ref.sha256) == (len(data), sha(data)), ref
        assert ref.object == artifact_name(plan_id, "make", 1, rel)
        assert await object_bytes(mesh, ref.object) == data


async def test_a_dependent_on_another_host_gets_the_files_from_the_store(mesh: Mesh) -> None:
    """`make` runs on the first host, which then goes away with the file it wrote; `use`, on a
    second host, finds the file in its working directory all the same: fetched from the store."""
    mesh.brain()
    mesh.worker("first", 1)  # class cpu only: `use` (class script) waits for the second host
    body_make = "mkdir -p out && printf 'made on the first host\\n' > out/report.txt"
    text = plan(
        task("make", body_make, "- artifacts: out/report.txt"),
        task(
            "use",
            "cat out/report.txt",
            "- depends_on: make",
            "- class: script",
        ),
    )
    plan_id = await mesh.submit_text(text)
    await mesh.wait_task(plan_id, "make", "succeeded")
    mesh._expected_dead.add("first")
    mesh.kill("first", signal.SIGTERM)
    made = mesh.tmp / "out" / "report.txt"
    assert made.read_bytes() == b"made on the first host\n"
    made.unlink()
    other_host(mesh, "second", "--gpu", "none", "--classes", "script")
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    use = await finished(mesh, plan_id, "use")
    assert use.worker != (await finished(mesh, plan_id, "make")).worker
    assert "made on the first host" in use.stdout_tail
    assert made.read_bytes() == b"made on the first host\n"
    assert log_count(mesh, "second", "fetched 1 artifacts of its dependencies") == 1


async def test_a_dependency_file_already_in_place_is_not_fetched_and_a_changed_one_is(mesh: Mesh) -> None:
    mesh.brain()
    mesh.worker("first", 1)
    text = plan(
        task("make", "printf 'v1' > a.txt && printf 'same' > b.txt", "- artifacts: *.txt"),
        task("use", "cat a.txt b.txt", "- depends_on: make", "- class: script"),
    )
    plan_id = await mesh.submit_text(text)
    await mesh.wait_task(plan_id, "make", "succeeded")
    (mesh.tmp / "a.txt").write_bytes(b"changed")
    other_host(mesh, "second", "--gpu", "none", "--classes", "script")
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    assert "v1same" in (await finished(mesh, plan_id, "use")).stdout_tail
    assert log_count(mesh, "second", "fetched 1 artifacts of its dependencies (2 bytes)") == 1


async def test_artifacts_over_the_limit_fail_the_attempt_as_a_definition_error(mesh: Mesh) -> None:
    mesh.env["MESH_ARTIFACT_MAX_MB"] = "1"
    mesh.brain()
    mesh.worker()
    body = "head -c 700000 /dev/zero > a.bin && head -c 700000 /dev/zero > b.bin"
    plan_id = await mesh.submit_text(plan(task("big", body, "- artifacts: *.bin", "- retries: 3")))
    assert (await mesh.wait_plan(plan_id)).status == "failed"
    rec = (await mesh.tasks(plan_id))["big"]
    assert rec.attempt == 1, "a definition error is not retried"
    assert "artifact_max_mb=1" in rec.error and "1.3 MB (2 files)" in rec.error, rec.error
    run = await finished(mesh, plan_id, "big")
    assert not run.ok and run.files == ()
    assert await object_names(mesh, artifact_prefix(plan_id)) == []


async def test_a_failed_attempt_keeps_its_files_and_a_sensitive_one_its_artifacts(mesh: Mesh) -> None:
    mesh.brain()
    mesh.worker()
    text = plan(
        task("broken", "printf 'partial' > part.txt; exit 3", "- artifacts: part.txt", "- retries: 0"),
        task("secret", "printf 'key' > key.txt && echo shh", "- artifacts: key.txt", "- sensitive: true"),
    )
    plan_id = await mesh.submit_text(text)
    await mesh.wait_plan(plan_id)
    broken = await finished(mesh, plan_id, "broken")
    assert not broken.ok and [f.path for f in broken.files] == ["part.txt"]
    assert await object_bytes(mesh, broken.files[0].object) == b"partial"
    secret = await finished(mesh, plan_id, "secret")
    assert secret.ok and secret.sensitive and secret.stdout_tail == ""
    assert [f.path for f in secret.files] == ["key.txt"]
    assert await object_bytes(mesh, secret.files[0].object) == b"key"


async def test_archiving_a_plan_deletes_its_artifacts_and_outputs(mesh: Mesh) -> None:
    mesh.env["MESH_ARCHIVE_AFTER_DAYS"] = "0.00003"  # about 2.6 s
    mesh.env["MESH_SWEEP_S"] = "0.5"
    mesh.brain()
    mesh.worker()
    # another plan, still running: its objects stay (its id starts like the archived one's)
    gate = mesh.tmp / "gate"
    other = await mesh.submit_text(
        plan(
            task("keep", "printf 'y' > y.txt", "- artifacts: y.txt"),
            task("wait", f"while [ ! -f {gate} ]; do sleep 0.1; done", "- depends_on: keep"),
        ),
        "arch2",
    )
    await mesh.wait_task(other, "keep", "succeeded")
    text = plan(task("keep", "printf 'x' > x.txt", "- artifacts: x.txt"))
    plan_id = await mesh.submit_text(text, "arch")
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    run = await finished(mesh, plan_id, "keep")
    assert await object_names(mesh, artifact_prefix(plan_id)) == [run.files[0].object]
    # a model task's output too big (or too sensitive) for its event is an object like this one
    store = await (await mesh.bus()).objects()
    await put_bytes(store, output_prefix(plan_id) + "keep/1", b"a long answer")
    await put_bytes(store, output_prefix(other) + "keep/1", b"another plan's answer")
    await until(lambda: log_count(mesh, "brain", "objects of archived plans"), HANG_S, "the objects deleted")
    assert await mesh.plan(plan_id) is None, "archived"
    assert await object_names(mesh, artifact_prefix(plan_id)) == []
    assert await object_names(mesh, output_prefix(plan_id)) == []
    assert await object_names(mesh, artifact_prefix(other)) == [artifact_name(other, "keep", 1, "y.txt")]
    assert await object_names(mesh, output_prefix(other)) == [output_prefix(other) + "keep/1"]
    gate.touch()
    assert (await mesh.wait_plan(other)).status == "succeeded"


@pytest.mark.models
async def test_an_embedding_saved_by_a_model_task_is_an_artifact(mesh: Mesh) -> None:
    """The `.npy` an embed task saves (with `save:` under the working directory, or without one
    kept in memory and written nowhere: then by its base name, a big one too) is stored like a
    declared file, and a dependent on another host gets it in its working directory."""
    np = pytest.importorskip("numpy")
    mesh.env["HF_HUB_OFFLINE"] = "1"
    mesh.env["MESH_DATA_DIR"] = str(mesh.tmp / "data")  # (where no file is to be written)
    mesh.brain()
    mesh.worker("gpu", 1, "--gpu", "none", "--classes", "script")
    text = "\n".join(
        [
            "# Vectors",
            "",
            "## Tasks",
            "",
            "### named",
            "",
            f"{FENCE}embed",
            "text: a lantern in the harbour",
            "text: copper and thunder",
            "save: vec/named.npy",
            FENCE,
            "",
            "### default",
            "",
            f"{FENCE}embed",
            "text: a quiet meadow",
            FENCE,
            "",
            "### big",
            "",
            f"{FENCE}embed",
            # 200 x 384 float32: over the size stored with others in one write (256 KiB)
            *(f"text: line {i} of a long list" for i in range(200)),
            FENCE,
            "",
            task("use", "ls vec/named.npy default.npy big.npy", "- depends_on: named, default, big"),
        ]
    )
    plan_id = await mesh.submit_text(text)
    await mesh.wait_task(plan_id, "default", "succeeded", timeout_s=300)
    await mesh.wait_task(plan_id, "named", "succeeded", timeout_s=300)
    named = await finished(mesh, plan_id, "named")
    saved = (mesh.tmp / "vec" / "named.npy").read_bytes()
    assert [(f.path, f.size, f.sha256) for f in named.files] == [("vec/named.npy", len(saved), sha(saved))]
    default = await finished(mesh, plan_id, "default")
    assert [f.path for f in default.files] == ["default.npy"]
    stored = await object_bytes(mesh, default.files[0].object)
    assert sha(stored) == default.files[0].sha256
    await mesh.wait_task(plan_id, "big", "succeeded", timeout_s=300)
    big = await finished(mesh, plan_id, "big")
    assert [f.path for f in big.files] == ["big.npy"] and big.files[0].size > 256 * 1024
    assert sha(await object_bytes(mesh, big.files[0].object)) == big.files[0].sha256
    # on the worker's host only the file a body saved: the others are in the object store alone
    assert sorted(mesh.tmp.rglob("*.npy")) == [mesh.tmp / "vec" / "named.npy"]
    (mesh.tmp / "vec" / "named.npy").unlink()
    other_host(mesh, "cpu")
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    assert np.load(mesh.tmp / "vec" / "named.npy").shape == (2, 384)
    assert np.load(mesh.tmp / "default.npy").shape == (1, 384)
    assert np.load(mesh.tmp / "big.npy").shape == (200, 384)
    assert log_count(mesh, "cpu", "fetched 3 artifacts of its dependencies") == 1
