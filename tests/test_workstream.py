"""The work stream keeps acknowledged items until the brain purges them in bulk
(`mesh.bus.workstream`): what is purged and what never is, the queue read from the consumers,
and an old install's work-queue stream made a limits one with its queued tasks run once."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.js.api import ConsumerConfig, ConsumerInfo, RetentionPolicy

from mesh.bus.resources import _stream_config, stream_definitions
from mesh.bus.workstream import (
    WorkPurger,
    make_limits,
    purge_bounds,
    queued,
    subjects_overlap,
    work_retention,
)
from tests.conftest import Mesh
from tests.faults import until


def test_subjects_overlap() -> None:
    assert subjects_overlap("m.work.cpu", "m.work.cpu")
    assert subjects_overlap("m.work.cpu", "m.work.*")
    assert subjects_overlap("m.work.cpu", "m.work.>")
    assert subjects_overlap("m.work.llm.a", "m.work.>")
    assert subjects_overlap("m.work.llm.a", "")  # no filter: every subject
    assert subjects_overlap("m.work.*.a", "m.work.llm.*")
    assert not subjects_overlap("m.work.cpu", "m.work.gpu")
    assert not subjects_overlap("m.work.llm.a", "m.work.*")
    assert not subjects_overlap("m.work.cpu", "m.work.cpu.x")
    assert not subjects_overlap("m.work", "m.work.>")


def info(name: str, floor: int, *filters: str) -> ConsumerInfo:
    config: dict[str, Any] = {"durable_name": name, "ack_policy": "explicit"}
    if len(filters) == 1:
        config["filter_subject"] = filters[0]
    elif filters:
        config["filter_subjects"] = list(filters)
    return ConsumerInfo.from_response(
        {
            "name": name,
            "stream_name": "W",
            "config": config,
            "created": "2026-01-01T00:00:00Z",
            "ack_floor": {"consumer_seq": floor, "stream_seq": floor},
        }
    )


def test_purge_bounds_are_each_subjects_lowest_overlapping_ack_floor() -> None:
    bounds = purge_bounds(
        [
            info("workers-cpu", 40, "m.work.cpu"),
            info("workers-gpu", 7, "m.work.gpu"),
            info("workers-llm-a", 30, "m.work.llm.a"),
            # an operator's consumer over every llm subject holds that subject back
            info("watch", 12, "m.work.llm.>"),
            # a consumer of mesh's with a wildcard filter is never purged by it
            info("worker-odd", 99, "m.work.to.*"),
        ]
    )
    assert bounds == {"m.work.cpu": 41, "m.work.gpu": 8, "m.work.llm.a": 13}


async def count(mesh: Mesh, subject: str) -> int:
    bus = await mesh.bus()
    state = (await bus.js.stream_info(bus.names.work_stream, subjects_filter=subject)).state
    return sum((state.subjects or {}).values())


async def test_a_purge_removes_only_what_every_consumer_acknowledged(mesh: Mesh) -> None:
    bus = await mesh.bus()
    js, n = bus.js, bus.names
    stream = n.work_stream
    assert await work_retention(js, stream) == "limits"
    cpu, llm = n.work("cpu"), n.work_llm("m1")
    for i in range(10):
        await js.publish(cpu, f"item {i}".encode())
    await js.publish(llm, b"no worker holds this model yet")
    sub = await js.pull_subscribe_bind(durable=n.workers_consumer("cpu"), stream=stream)
    got = await sub.fetch(10, timeout=5)
    assert len(got) == 10
    for i, msg in enumerate(got):
        if i != 2:
            await msg.ack_sync()
    purger = WorkPurger(js, stream)
    assert await queued(js, stream) == 2  # the third item in flight; the LLM item waiting
    await purger.purge()
    # below the unacknowledged third item only: it and everything after it stay
    assert await count(mesh, cpu) == 8
    assert await count(mesh, llm) == 1
    await got[2].nak()  # handed back: delivered again, and still not purged
    again = await sub.fetch(1, timeout=5)
    await purger.purge()
    assert await count(mesh, cpu) == 8
    await again[0].ack_sync()
    await purger.purge()
    assert await count(mesh, cpu) == 0
    # the item no consumer takes is never purged, and counts as queued
    assert await count(mesh, llm) == 1
    assert await queued(js, stream) == 1

    # another consumer over the same subject that has not acknowledged them holds them back
    await js.add_consumer(
        stream, ConsumerConfig(durable_name="watch", filter_subject=n.work_all, ack_policy="explicit")
    )
    for i in range(3):
        await js.publish(cpu, f"more {i}".encode())
    for msg in await sub.fetch(3, timeout=5):
        await msg.ack_sync()
    await purger.purge()
    assert await count(mesh, cpu) == 3
    await js.delete_consumer(stream, "watch")
    await purger.purge()
    assert await count(mesh, cpu) == 0
    assert await count(mesh, llm) == 1

    # what the brain keeps (an item whose task's end it has not yet seen) stays, acknowledged
    # or not, and everything after it on its subject
    first = (await js.publish(cpu, b"kept")).seq
    await js.publish(cpu, b"after")
    for msg in await sub.fetch(2, timeout=5):
        await msg.ack_sync()
    await purger.purge({cpu: first, n.work("script"): 1})
    assert await count(mesh, cpu) == 2
    await purger.purge({})
    assert await count(mesh, cpu) == 0


async def make_work_queue(mesh: Mesh, keep: bool = False) -> None:
    """Turn the work stream into an old install's work-queue one, its consumers and (`keep`)
    its items with it."""
    bus = await mesh.bus()
    js, stream = bus.js, bus.names.work_stream
    items = []
    if keep:
        state = (await js.stream_info(stream)).state
        for seq in range(state.first_seq, state.last_seq + 1):
            items.append(await js.get_msg(stream, seq))
    consumers = [c.config for c in await js.consumers_info(stream)]
    await js.delete_stream(stream)
    definition = next(d for d in stream_definitions(mesh.settings) if d["name"] == stream)
    await js.add_stream(_stream_config({**definition, "retention": "workqueue"}))
    for config in consumers:
        config.name = config.durable_name
        await js.add_consumer(stream, config)
    for raw in items:
        await js.publish(raw.subject or "", raw.data or b"", headers=raw.headers)
    assert await work_retention(js, stream) == "workqueue"


async def test_make_limits_makes_an_old_work_queue_stream_anew_with_its_consumers(mesh: Mesh) -> None:
    bus = await mesh.bus()
    js, n = bus.js, bus.names
    await js.add_consumer(
        n.work_stream,
        ConsumerConfig(
            name=n.llm_consumer("m1"), durable_name=n.llm_consumer("m1"), filter_subject=n.work_llm("m1")
        ),
    )
    await make_work_queue(mesh)
    # any agent's start leaves it a work queue, rather than failing on it
    await bus.ensure_resources()
    assert await work_retention(js, n.work_stream) == RetentionPolicy.WORK_QUEUE.value
    await js.publish(n.work("cpu"), b"lost with the old stream")
    assert await make_limits(js, mesh.settings)
    assert await work_retention(js, n.work_stream) == "limits"
    consumers = {c.name: c.config.filter_subject for c in await js.consumers_info(n.work_stream)}
    assert consumers == {n.workers_consumer("cpu"): n.work("cpu"), n.llm_consumer("m1"): n.work_llm("m1")}
    assert (await js.stream_info(n.work_stream)).state.messages == 0
    assert not await make_limits(js, mesh.settings)


async def test_a_work_queue_stream_this_user_may_not_delete_stays_one(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-role permissions keep the brain from deleting a stream: a refused (or, a permissions
    violation, unanswered) delete leaves the old work queue working as before."""
    bus = await mesh.bus()
    js, n = bus.js, bus.names
    await make_work_queue(mesh)

    async def refused(name: str) -> bool:
        raise nats.errors.TimeoutError

    monkeypatch.setattr(js, "delete_stream", refused)
    assert not await make_limits(js, mesh.settings)
    assert await work_retention(js, n.work_stream) == RetentionPolicy.WORK_QUEUE.value
    assert [c.name for c in await js.consumers_info(n.work_stream)] == [n.workers_consumer("cpu")]


@pytest.mark.integration
async def test_an_old_work_queue_install_runs_its_queued_and_running_tasks_once(
    mesh: Mesh, tmp_path: Path
) -> None:
    """A brain starting on an old install's work queue makes the stream anew: the queued items
    go with it and come back from the ready tasks; a task running meanwhile finishes and
    reports as before. Each task runs once."""
    ran, gate = tmp_path / "ran", tmp_path / "gate"
    queued_tasks = "".join(f"### q{i}\n```shell\necho q{i} >> {ran}\n```\n\n" for i in range(4))
    text = (
        "# Old\n\n## Tasks\n\n### long\n- priority: 10\n```shell\n"
        f"while [ ! -e {gate} ]; do sleep 0.1; done; echo long >> {ran}\n```\n\n{queued_tasks}"
    )
    mesh.brain()
    mesh.worker("w1", slots=1)
    plan_id = await mesh.submit_text(text)
    await mesh.wait_task(plan_id, "long", "running")
    tasks = await mesh.tasks(plan_id)
    assert all(tasks[f"q{i}"].status == "ready" for i in range(4))
    mesh._expected_dead.add("brain")
    mesh.kill("brain", signal.SIGTERM)
    await make_work_queue(mesh, keep=True)
    bus = await mesh.bus()
    assert await queued(bus.js, bus.names.work_stream) == 5
    mesh.brain("brain2")
    await until(lambda: "made the work stream" in mesh.log("brain2"), 60, "the work stream made anew")
    gate.touch()
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"
    assert sorted(ran.read_text().split()) == ["long", "q0", "q1", "q2", "q3"]
    assert await work_retention(bus.js, bus.names.work_stream) == "limits"

    async def purged() -> bool:
        return await count(mesh, bus.names.work("cpu")) == 0

    await until(purged, 60, "the acknowledged items purged by the brain")


@pytest.mark.integration
async def test_done_items_a_long_task_holds_back_are_deleted_alone(mesh: Mesh, tmp_path: Path) -> None:
    """A long task's unacknowledged item keeps its consumer's ack floor, and so the purge, from
    moving: the items of the tasks done after it are deleted alone `work_stuck_s` later, so the
    stream does not fill behind it; the long task's own item stays until it is done."""
    mesh.env["MESH_WORK_STUCK_S"] = "0.5"
    gate = tmp_path / "gate"
    short = "".join(f"### s{i}\n```noop\n```\n\n" for i in range(6))
    text = (
        "# Stuck\n\n## Tasks\n\n### long\n- priority: 10\n```shell\n"
        f"while [ ! -e {gate} ]; do sleep 0.1; done\n```\n\n{short}"
    )
    mesh.brain()
    mesh.worker("w1", slots=2)
    plan_id = await mesh.submit_text(text)
    await mesh.wait_task(plan_id, "long", "running")
    for i in range(6):
        await mesh.wait_task(plan_id, f"s{i}", "succeeded")
    cpu = mesh.settings.names.work("cpu")

    async def only_the_long_one() -> bool:
        return await count(mesh, cpu) == 1

    await until(only_the_long_one, 60, "the done items deleted, the long task's kept")
    gate.touch()
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"

    async def none() -> bool:
        return await count(mesh, cpu) == 0

    await until(none, 60, "the long task's item purged once it was acknowledged")
