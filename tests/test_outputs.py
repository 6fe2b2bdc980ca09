"""`mesh output`: a task's output for its last or any attempt, as text, JSON or files, a plan's
outputs in short, and the summary `mesh submit --wait` ends with.

Real nats-server, real brain and workers, the real `mesh` command; a forged report from another
worker must not change what is shown. The embedding preview runs the real embedding model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mesh import events
from mesh.bus.outputs import OutputError, outcome_text, task_outcome, task_output
from mesh.events import RunFinished
from mesh.names import HEADER_MSG_ID, HEADER_TYPE
from tests.conftest import HANG_S, Mesh
from tests.faults import until

pytestmark = pytest.mark.integration


def outputs_plan(tmp: Path) -> str:
    return f"""# Outputs

## Tasks

### hello
```shell
echo hello-out
echo second line
```

### flaky
- retries: 2
```shell
if [ -f {tmp}/flaky.once ]; then echo ok-now; else touch {tmp}/flaky.once; echo boom-stderr >&2; exit 3; fi
```

### secret
- sensitive: true
```shell
echo the-secret-value
```

### gate
- timeout: 2m
```shell
while [ ! -f {tmp}/gate.open ]; do sleep 0.1; done
echo opened
```

### leaf
- depends_on: hello, flaky, gate
```shell
echo leaf-done
```
"""


async def forge(mesh: Mesh, plan_id: str, task_id: str, worker: str, output: str) -> None:
    """A `run.finished` for attempt 1 of a task that worker never ran (an open server lets
    anyone publish it)."""
    bus = await mesh.bus()
    subject = bus.names.run_event(plan_id, task_id, "finished", worker)
    msg = RunFinished(
        plan_id=plan_id,
        task_id=task_id,
        attempt=1,
        worker=worker,
        at=time.time(),
        ok=True,
        duration_s=0.1,
        output=output,
        stdout_tail=output,
    )
    await bus.js.publish(
        subject,
        events.encode(msg),
        headers={HEADER_TYPE: "run.finished", HEADER_MSG_ID: f"forged-{worker}-{time.time()}"},
    )


async def test_output_of_tasks_attempts_json_sensitive_plan_and_save(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    plan_id = await mesh.submit_text(outputs_plan(tmp_path), plan_id="outs")
    await mesh.wait_task(plan_id, "gate", "running")

    # clear errors: no plan, no task, a task with no completion yet
    for args, said in (
        (["nope.x"], "no plan 'nope'"),
        ([f"{plan_id}.nope"], "has no task 'nope'"),
        ([f"{plan_id}.gate"], "has not completed an attempt yet"),
        ([f"{plan_id}.hello", "--attempt", "5"], "has no attempt 5"),
    ):
        if args[0] == f"{plan_id}.hello":
            await mesh.wait_task(plan_id, "hello", "succeeded")
        result = mesh.run_cli("output", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert said in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr

    (tmp_path / "gate.open").touch()
    plan = await mesh.wait_plan(plan_id)
    assert plan.status == "succeeded"
    tasks = await mesh.tasks(plan_id)
    assert tasks["flaky"].attempt == 2

    # a shell task's stdout, as it is
    assert mesh.cli("output", f"{plan_id}.hello") == "hello-out\nsecond line\n"

    # the last attempt by default; the failed first one on request, with its stderr and exit code
    last = mesh.cli("output", f"{plan_id}.flaky")
    assert last == "ok-now\n"
    first = mesh.cli("output", f"{plan_id}.flaky", "--attempt", "1")
    assert "boom-stderr" in first and "exit code 3" in first and "ok-now" not in first, first

    # --json: one object
    data = json.loads(mesh.cli("output", f"{plan_id}.flaky", "--json"))
    assert data["plan"] == plan_id and data["task"] == "flaky" and data["attempt"] == 2
    assert data["ok"] is True and data["kind"] == "shell" and data["output"] == "ok-now\n"
    assert data["worker"] == tasks["flaky"].worker and data["sensitive"] is False
    assert data["files"] == [] and isinstance(data["metrics"], dict) and data["parsed"] is False
    failed = json.loads(mesh.cli("output", f"{plan_id}.flaky", "--json", "--attempt", "1"))
    assert failed["ok"] is False and failed["status"] == "retrying" and failed["rc"] == 3
    assert "boom-stderr" in failed["stderr"]

    # a sensitive task's output is withheld unless asked for
    hidden = mesh.run_cli("output", f"{plan_id}.secret")
    assert hidden.returncode == 1
    assert "withheld" in hidden.stderr and "--sensitive" in hidden.stderr
    assert "the-secret-value" not in hidden.stdout + hidden.stderr
    hidden_json = json.loads(mesh.cli("output", f"{plan_id}.secret", "--json"))
    assert hidden_json["output"] is None and hidden_json["withheld"] is True and hidden_json["sensitive"]
    assert mesh.cli("output", f"{plan_id}.secret", "--sensitive") == "the-secret-value\n"

    # the plan: every task, its status, attempt and first line; the sensitive one withheld
    listing = mesh.cli("output", plan_id)
    rows = {line.split()[0]: line for line in listing.splitlines() if line.strip()}
    assert "succeeded" in rows["hello"] and "hello-out" in rows["hello"] and "second" not in listing
    assert "ok-now" in rows["flaky"] and " 2 " in rows["flaky"]
    assert "withheld" in rows["secret"] and "the-secret-value" not in listing
    assert "opened" in rows["gate"] and "leaf-done" in rows["leaf"]
    lines = [json.loads(line) for line in mesh.cli("output", plan_id, "--json").splitlines()]
    assert [d["task"] for d in lines] == ["hello", "flaky", "secret", "gate", "leaf"]

    # --save: the output, as a file
    saved = tmp_path / "saved"
    mesh.cli("output", f"{plan_id}.hello", "--save", str(saved))
    assert (saved / "hello.output.txt").read_text() == "hello-out\nsecond line\n"
    refused = mesh.run_cli("output", f"{plan_id}.secret", "--save", str(tmp_path / "secret"))
    assert refused.returncode == 1 and not (tmp_path / "secret" / "secret.output.txt").exists()

    # a report from a worker that never ran the attempt, and one sent after the brain decided
    # under the honest worker's own id: neither is the output
    await forge(mesh, plan_id, "hello", "evil", "FORGED-OTHER")
    await forge(mesh, plan_id, "hello", tasks["hello"].worker, "FORGED-LATE")
    bus = await mesh.bus()

    async def both_forged() -> bool:
        history = await mesh.history(bus.names.run_events(plan_id, "hello", "finished"))
        return len(history) == 3

    await until(both_forged, HANG_S, "the forged reports in the history")
    assert mesh.cli("output", f"{plan_id}.hello") == "hello-out\nsecond line\n"
    assert "FORGED" not in mesh.cli("output", plan_id)
    assert "FORGED" not in mesh.cli("output", f"{plan_id}.hello", "--attempt", "1")
    outcome = await task_outcome(bus, plan_id, "hello")
    assert outcome.worker == tasks["hello"].worker
    assert await outcome_text(bus, outcome) == "hello-out\nsecond line\n"


SUMMED = """# Summed

## Tasks

### first
```shell
echo first-out
```

### alpha
- depends_on: first
```shell
echo alpha-line
echo alpha-more
```

### hush
- sensitive: true
```shell
echo hush-value
```
"""


async def test_submit_wait_ends_with_the_leaf_outputs(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    plan = tmp_path / "summed.md"
    plan.write_text(SUMMED)
    done = mesh.run_cli("submit", str(plan), "--wait")
    assert done.returncode == 0, done.stderr
    plan_id = done.stdout.strip().splitlines()[0]
    said = done.stderr
    assert f"mesh output {plan_id}.TASK" in said
    summary = said[said.index(f"mesh output {plan_id}.TASK") :]
    # the leaf tasks' first lines (first is a dependency, not a final output)
    assert "alpha-line" in summary and "alpha-more" not in summary
    assert "first-out" not in summary
    assert "hush" in summary and "withheld" in summary and "hush-value" not in said
    assert summary.rstrip().endswith(f"plan {plan_id} succeeded")

    # a failed plan: its failure, and a task that never ran, said as such
    broken = tmp_path / "broken.md"
    broken.write_text(BROKEN)
    failed = mesh.run_cli("submit", str(broken), "--wait")
    assert failed.returncode == 1, failed.stderr
    broken_id = failed.stdout.strip().splitlines()[0]
    assert f"mesh output {broken_id}.TASK" not in failed.stderr, "no final output to sum up"
    shown = mesh.cli("output", f"{broken_id}.boom")
    assert "error: exit code 3" in shown and "stderr:\nbad-news" in shown, shown
    never = mesh.run_cli("output", f"{broken_id}.after")
    assert never.returncode == 2 and "never ran: it is failed (dependency)" in never.stderr, never.stderr
    listing = mesh.cli("output", broken_id)
    assert "exit code 3" in listing and "after" in listing, listing


BROKEN = """# Broken

## Tasks

### boom
- retries: 0
```shell
echo bad-news >&2
exit 3
```

### after
- depends_on: boom
```shell
echo never
```
"""


async def test_save_writes_the_artifacts_of_the_attempt(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("w1")
    text = (
        "# Files\n\n## Tasks\n\n### make\n- artifacts: out/*.txt\n"
        "```shell\nmkdir -p out\necho data-a > out/a.txt\necho data-b > out/b.txt\necho made\n```\n"
    )
    plan_id = await mesh.submit_text(text, plan_id="files")
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    data = json.loads(mesh.cli("output", f"{plan_id}.make", "--json"))
    assert sorted(f["path"] for f in data["files"]) == ["out/a.txt", "out/b.txt"]
    assert all(len(f["sha256"]) == 64 and f["size"] == 7 for f in data["files"])
    (tmp_path / "out").rename(tmp_path / "made")  # what --save writes comes from the store
    saved = tmp_path / "saved"
    mesh.cli("output", f"{plan_id}.make", "--save", str(saved))
    assert (saved / "out" / "a.txt").read_text() == "data-a\n"
    assert (saved / "out" / "b.txt").read_text() == "data-b\n"
    assert (saved / "make.output.txt").read_text() == "made\n"
    listing = mesh.cli("output", plan_id)
    assert "made" in listing and " 2" in listing


@pytest.mark.models
async def test_an_embedding_shows_its_shape_and_a_preview(mesh: Mesh, tmp_path: Path) -> None:
    mesh.brain()
    mesh.worker("gpu", 1, "--gpu", "none", "--classes", "script")
    text = (
        "# Vectors\n\n## Tasks\n\n### index\n- timeout: 5m\n"
        f"```embed\ntext: When is the meeting?\ntext: A kitten naps.\ntext: Budget figures.\n"
        f"save: {tmp_path}/vectors.npy\n```\n"
    )
    plan_id = await mesh.submit_text(text, plan_id="vec")
    assert (await mesh.wait_plan(plan_id, 300)).status == "succeeded"
    shown = mesh.cli("output", f"{plan_id}.index")
    assert "3 vectors x 384 dims" in shown, shown
    assert "vectors: 3 x 384 (float32), norms 1.000 to 1.000" in shown, shown
    assert "[0] " in shown and "[2] " in shown, shown
    data = json.loads(mesh.cli("output", f"{plan_id}.index", "--json"))
    assert data["kind"] == "embed" and data["metrics"]["vectors"] == 3 and data["metrics"]["dim"] == 384


async def test_a_big_output_rewritten_in_the_store_is_refused_not_shown(mesh: Mesh) -> None:
    # any worker may write the object store; only the task's own worker can say, in its report,
    # what the output it stored there was. (A sensitive task's output is always stored, never
    # in its event: so is a model's answer bigger than output_event_bytes.)
    mesh.brain()
    mesh.worker("w1")
    text = (
        "# Big\n\n## Tasks\n\n### big\n- sensitive: true\n"
        "```shell\nfor i in $(seq 1 40); do echo line-$i; done\n```\n"
    )
    plan_id = await mesh.submit_text(text, plan_id="big")
    assert (await mesh.wait_plan(plan_id)).status == "succeeded"
    bus = await mesh.bus()
    outcome = await task_outcome(bus, plan_id, "big")
    assert outcome.report is not None and outcome.report.output_object
    assert len(outcome.report.output_sha256) == 64
    assert (await outcome_text(bus, outcome)).splitlines()[-1] == "line-40"
    shown = mesh.run_cli("output", f"{plan_id}.big", "--sensitive")
    assert shown.returncode == 0 and "line-40" in shown.stdout, shown.stderr

    await (await bus.objects()).put(outcome.report.output_object, b"forged output\n")
    with pytest.raises(OutputError, match="not what its worker reported"):
        await outcome_text(bus, outcome)
    with pytest.raises(OutputError, match="not what its worker reported"):
        await task_output(bus, plan_id, "big")
    refused = mesh.run_cli("output", f"{plan_id}.big", "--sensitive")
    assert refused.returncode != 0 and "forged" not in refused.stdout
    assert "not what its worker reported" in refused.stderr
