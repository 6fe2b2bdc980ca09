"""A worker's decisions: which lanes claim work, when its GPU's models load and unload, whether
a work item is still wanted, and what the worker's reports say. Pure: no I/O, time passed in.

`agents/worker.py` and its pieces (`agents/worker_*.py`) do the I/O and ask these functions
what to do: the lanes are pull consumers with slots (`lanes_enabled`, `room`, `runs_fetched`),
a GPU worker derives its `gpu.state` from what it holds (`gpu_state`, `gpu_report`), a
resource item from the brain becomes a step (`resource_step`, `load_refusal`), a suspect item
is checked against its task's record (`suspect`, `still_wanted`, `verdict_action`), and every
run is reported by a `run.started` and a `run.finished` built here.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from mesh import placement as gs
from mesh.events import MODEL_BODY_KINDS, FileRef, GpuControl, ResourceItem, RunFinished, RunStarted, WorkItem
from mesh.records import INFLIGHT_STATES, RUNNING, TaskRecord
from mesh.status import FailReason

V = TypeVar("V")

# how many recently cancelled tasks, and recently finished attempts, a worker remembers
CANCELLED_MEMORY = 100_000
# an item queued longer than this may predate a decision of the brain: checked before it runs
FRESH_S = 2.0
# an item whose task has no record yet is offered again after this long
LATER_S = 2.0
# how long after its reconnection a worker waits before it runs an item stored before it, when
# the record cannot say that no other worker runs it: a server restart can lose the record of a
# delivery, and the worker that took it reports its run only once it is connected again too
# (its reconnection and its reports: 0.5 s between tries, and `LOST_REPLY_S` for a report
# lost with the old connection)
SETTLE_S = 3.0
# the classes whose work needs a model: a worker of either owns a GPU (or a CPU standing in)
MODEL_CLASSES = ("script", "llm")
# a resource task older than this was meant for an earlier state of the mesh: not acted on
RESOURCE_STALE_S = 600.0

# the lane of a GPU worker's own queue (its resource tasks), and the lanes of model work
OWN = "own"
LLM = "llm"
SCRIPT = "script"

# what a worker does with a suspect item, after reading its task's record
RUN = "run"  # run it
SKIP = "skip"  # the task no longer wants this attempt
WAIT = "wait"  # another live worker runs this very attempt: no second copy beside it
LATER = "later"  # no record of the task yet: look again soon
SETTLE = "settle"  # delivered again after a server restart: look again once the workers report
ASK = "ask"  # another worker ran this attempt: whether it is still registered decides

# what becomes of a delivery once the verdict is known
NAK_LATER = "nak-later"
ACK = "ack"

# a delivery of an attempt this worker already ran or runs
REPEAT_DONE = "done"
REPEAT_RUNNING = "running"


def remember(memory: dict[str, V], key: str, value: V, limit: int = CANCELLED_MEMORY) -> None:
    """Add to an insertion-ordered memory, forgetting the oldest beyond `limit`."""
    memory[key] = value
    while len(memory) > limit:
        del memory[next(iter(memory))]


def item_key(plan_id: str, task_id: str) -> str:
    """A task's key: in the tasks bucket, and in what a worker remembers."""
    return f"{plan_id}.{task_id}"


# claiming ----------------------------------------------------------------------------------


def runs_models(classes: Iterable[str]) -> bool:
    """Whether a worker of these classes owns a GPU (or the CPU standing in for one)."""
    return any(c in MODEL_CLASSES for c in classes)


def shared_lanes(classes: Iterable[str]) -> tuple[str, ...]:
    """The classes a worker claims from the shared queue of at start. LLM work comes from a
    per-model queue, taken only while this GPU holds that model."""
    return tuple(c for c in classes if c != LLM)


def lane_slots(cls: str, slots: int, script_slots: int) -> int:
    """How many items of a class a worker runs at once."""
    return script_slots if cls == SCRIPT else slots


def control_for(control: object, gpu: str, source: str) -> GpuControl | None:
    """The control a value of the control bucket sets on this GPU's `source` key; None when it
    is none (deleted, another type, another GPU's or source's value under this key)."""
    match control:
        case GpuControl() if (control.gpu, control.source) == (gpu, source):
            return control
        case _:
            return None


def hold_reason(controls: Iterable[GpuControl]) -> str:
    """Why a GPU takes no work now ('' when it does): a thermal or an operator's pause, or a
    cordon."""
    reasons = [
        f"{c.source} {'cordon' if c.cordoned else 'pause'}: {c.reason}".rstrip(": ")
        for c in controls
        if c.paused or c.cordoned
    ]
    return "; ".join(sorted(reasons))


def lanes_enabled(lanes: Iterable[str], held: bool, llm_present: bool) -> dict[str, bool]:
    """Which lanes claim work. A held (paused, cordoned) GPU's worker claims nothing (what runs
    finishes); script work runs only where no LLM is loaded or loading (it would not fit beside
    it). The own lane is not held: the brain's resource tasks always come through."""
    out = {}
    for name in lanes:
        if name == OWN:
            continue
        enabled = not held
        if name == SCRIPT:
            enabled = enabled and not llm_present
        out[name] = enabled
    return out


def room(slots: int, running: int, enabled: bool) -> int:
    """How many items a lane may fetch now (0: it waits for a slot, or to be enabled)."""
    return slots - running if enabled else 0


# batches of small model tasks ------------------------------------------------------------------

# the body kinds whose items, fetched together, run as one model call (`agents/worker_items.py`)
BATCHED_KINDS = frozenset({"embed"})


def batch_key(item: WorkItem) -> str:
    """What items must share to run in one batch ('' for an item that always runs alone): the
    kind and the model (one encode call runs one model)."""
    return f"{item.kind}:{item.model}" if item.kind in BATCHED_KINDS and not item.more else ""


def batch_groups(keys: Sequence[str], most: int) -> list[list[int]]:
    """The runs a lane makes of the items it fetched, as indices in fetch order: items of one
    non-empty key together, at most `most` in a run; every item with key '' alone."""
    runs: list[list[int]] = []
    open_runs: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if not key or most <= 1:
            runs.append([i])
            continue
        run = open_runs.get(key)
        if run is None or len(run) >= most:
            run = open_runs[key] = []
            runs.append(run)
        run.append(i)
    return runs


def runs_fetched(lane: str, hold: str) -> bool:
    """Whether items a lane fetched are run: a GPU paused while its fetch was in flight hands
    them back for another GPU (its own queue's are always taken)."""
    return lane == OWN or not hold


# the GPU's state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuNow:
    """What a GPU's worker holds and runs at one moment."""

    # gs.BOOTING_LLM / gs.BOOTING_SCRIPT while a load runs, gs.FETCHING while its file comes
    booting: str = ""
    # the model being fetched, and how much of it has arrived (0 to 1)
    fetching: str = ""
    progress: float = 0.0
    # the loaded LLM ('' when none) and the memory it takes
    llm: str = ""
    llm_mb: int = 0
    # the script models loaded (sorted) and the memory they take
    script_models: tuple[str, ...] = ()
    reserved_mb: int = 0
    llm_running: int = 0
    script_running: int = 0
    running: int = 0

    @property
    def mesh_used_mb(self) -> int:
        """The GPU memory mesh's own models take."""
        return self.reserved_mb + self.llm_mb


def gpu_state(now: GpuNow, hold: str, override: str = "") -> str:
    """The state a GPU's worker reports (one of `mesh.placement`'s)."""
    if override:
        return override
    if hold:
        return gs.PAUSED
    if now.booting:
        return now.booting
    if now.llm:
        return gs.LLM_BUSY if now.llm_running else gs.LLM_READY
    if now.script_running:
        return gs.SCRIPT_BUSY
    return gs.IDLE


# how a GPU's state goes out
SILENT = ""  # unchanged, and nothing asked for it
KV_ONLY = "kv"  # a fresh reading: the gpus bucket only
EVENT = "event"  # a change, or an answer to the brain: an event and the bucket


def gpu_report(
    state: str, previous: str, force: bool = False, error: str = "", rid: str = "", refresh: bool = False
) -> str:
    """Whether (and how) a GPU's state goes out: SILENT, KV_ONLY or EVENT."""
    if state != previous or force or error or rid:
        return EVENT
    return KV_ONLY if refresh else SILENT


# models ------------------------------------------------------------------------------------


def stale(item: ResourceItem, now: float) -> bool:
    """Whether a resource task was meant for an earlier state of the mesh."""
    return now - item.at > RESOURCE_STALE_S


# what a resource task asks of a GPU, given what it holds
UNLOAD = "unload"
HAVE = "have"  # the model asked for is loaded already: answer at once
REFUSE = "refuse"
LOAD = "load"


def resource_step(item: ResourceItem, loaded: str, kind: str | None) -> tuple[str, str]:
    """(step, why): UNLOAD; HAVE; REFUSE with why; or LOAD (after unloading what is loaded and
    closing the script models). `loaded` is the LLM the GPU holds ('' none), `kind` the
    registry's kind of the model asked for (None when it is not in the registry)."""
    if item.action == "unload":
        return UNLOAD, ""
    if loaded and loaded == item.model:
        return HAVE, ""
    if kind != LLM:
        return REFUSE, f"load refused: {item.model!r} is not an llm model here"
    return LOAD, ""


def load_need_mb(item: ResourceItem, registry_mb: int) -> int:
    """The VRAM a load needs: what the brain placed it for (it learns what the model really takes),
    else the worker's registry figure."""
    return item.vram_mb if item.vram_mb > 0 else registry_mb


def load_refusal(model: str, need_mb: int, free_mb: int) -> str:
    """Why a model does not fit in what is free ('' when it does)."""
    if need_mb > free_mb:
        return f"load of {model} refused: it needs {need_mb} MB and {free_mb} MB are free"
    return ""


def model_missing(item: WorkItem, runs_models: bool, llm: str) -> str:
    """Why a model task cannot run here, before its model is looked up ('' when it may: a
    script model loads on first use)."""
    need = MODEL_BODY_KINDS.get(item.kind)
    if need is None:
        return ""
    if not runs_models:
        return f"this worker runs no models ({item.kind})"
    if need == LLM and (not llm or llm != item.model):
        return f"{item.model} is not loaded here (this GPU holds {llm or 'none'})"
    return ""


# whether an item is still wanted -------------------------------------------------------------


def repeat(item: WorkItem, finished_attempt: int | None, running_attempt: int | None) -> str:
    """A delivery of an attempt that ran here and was reported already (REPEAT_DONE: only
    acknowledge it), of one running here now (REPEAT_RUNNING: run it once, acknowledge the newer
    delivery when done), or '' for new work. Both come of a server restart that lost the
    consumer's record of the first delivery or its acknowledgement."""
    if finished_attempt == item.attempt:
        return REPEAT_DONE
    if running_attempt == item.attempt:
        return REPEAT_RUNNING
    return ""


def suspect(delivery: int, queued_s: float, cancelled: bool, before_reconnect: bool = False) -> bool:
    """Whether an item is checked against its task's record before it runs. One taken fresh off
    the queue is current: the brain deletes the queued item of a task it cancels, resets or gives
    up. One redelivered, one that sat in the queue (the brain may have restarted since), one
    of a task seen cancelled, or one stored before this worker's connection came back (the
    server may have restarted, and lost the record of its delivery to another worker) may not
    be."""
    return delivery > 1 or queued_s > FRESH_S or cancelled or before_reconnect


def still_wanted(
    item: WorkItem,
    rec: TaskRecord | None,
    delivery: int,
    me: str,
    restart: bool = False,
    unsettled: bool = False,
    now: float = 0.0,
    ack_wait_s: float = 0.0,
) -> str:
    """RUN, SKIP, LATER (no record yet), ASK (whether the worker the record names is still
    registered decides: `owner_verdict`) or SETTLE. An unreadable record is the caller's: it
    runs the item as released (the brain rebuilds the record from the history when it starts).

    The brain writes a task's work item ahead of its record (in the same round trip, or in an
    earlier one where a big step writes many records), and a brain that crashed between the two
    leaves the record for the next one to repair: a record behind the item's attempt has not
    caught up with the release the item comes from, and the item is as current as a fresh one.

    A redelivery (delivery > 1) of a running attempt means JetStream stopped hearing from its
    worker: this one takes over. A first delivery of an attempt already running elsewhere
    happens when a server restart lost the consumer's record of the first one: if that worker
    is still registered, it still runs it. So does a redelivery of an attempt that started
    elsewhere less than half of `ack_wait_s` before `now`: JetStream gave up on an earlier
    delivery of the item (one that waited in a worker's client past `ack_wait_s`, which that
    worker then ran), not on the worker that runs it now.

    `restart` (`after_restart`): the item was stored before this worker's connection came
    back, and is delivered within `ack_wait_s` of that. A server restart may have lost the
    record of its delivery, and no worker could keep it alive while the server was away: a
    redelivery then says nothing of the worker running it, and is asked about as a first
    delivery is. `unsettled`: within `SETTLE_S` of the reconnection, a worker that took it
    before may have run it and report that only once it is connected again too; an item the
    record does not settle is looked at again once that report can have come (SETTLE)."""
    if rec is None:
        return LATER
    behind = rec.attempt < item.attempt
    if not behind and (rec.status not in INFLIGHT_STATES or rec.attempt != item.attempt):
        return SKIP
    elsewhere = not behind and rec.status == RUNNING and rec.worker not in ("", me)
    recent = ack_wait_s > 0 and rec.started_at > now - ack_wait_s / 2
    if elsewhere and (delivery == 1 or restart or recent):
        return ASK
    if unsettled:
        return SETTLE
    return RUN


def after_restart(
    stored_at: float, reconnected_at: float, now: float, ack_wait_s: float
) -> tuple[bool, bool]:
    """`still_wanted`'s `restart` and `unsettled` for an item stored at `stored_at`, delivered
    `now` to a worker whose connection came back at `reconnected_at` (0: never lost)."""
    before = stored_at < reconnected_at
    return before and now < reconnected_at + ack_wait_s, before and now < reconnected_at + SETTLE_S


def owner_verdict(registered: bool) -> str:
    """The verdict of ASK: WAIT while the worker running the attempt is registered; RUN once it
    is gone (this is the redelivery that takes over)."""
    return WAIT if registered else RUN


def verdict_action(verdict: str, delivery: int, max_deliveries: int) -> str:
    """What becomes of a suspect delivery: NAK_LATER (offered again after LATER_S), ACK (not
    run: skipped, or held by a live worker; should that worker die, the brain gives the attempt
    up as lost and releases a new one) or RUN. A task with no record after `max_deliveries`
    offers is dropped."""
    if verdict == LATER and delivery < max_deliveries:
        return NAK_LATER
    if verdict != RUN:
        return ACK
    return RUN


def dead_letter_why(delivery: int, max_deliveries: int) -> str:
    """Why an item is dead-lettered ('' when it is not): every worker that took it died with it."""
    if delivery <= max_deliveries:
        return ""
    return (
        f"delivered {delivery} times (more than max_deliveries={max_deliveries}); "
        "every worker that took it stopped heartbeating"
    )


# reports -----------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What an executor says of one run: the worker's report is built from it."""

    ok: bool
    duration_s: float
    rc: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    error: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    # the task can never run as defined: the brain fails it without retrying
    definition_error: bool = False
    # what the task produced (the response, the transcript, a summary of the vectors)
    output: str = ""
    prompt: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    # files the executor made in memory and wrote nowhere (a model task's file without `save:`):
    # name -> contents, kept in the object store as the attempt's artifacts, as the files above
    artifact_data: dict[str, bytes] = field(default_factory=dict)
    # the task has a schema and the output is JSON valid against it
    parsed: bool = False
    # `error` as a sensitive run reports it, where `error` quotes what the task saw or made (a
    # schema's complaint names the answer's values); '' : `error` says nothing of them
    error_withheld: str = ""


def start_report_after(delivery: int, after_s: float, batch: int = 1) -> float:
    """How long a run's `run.started` is held back. A first delivery's waits `after_s`: a task
    that ends sooner reports its start in `run.finished`. A redelivery's goes at once: the brain
    records who took the task over. A task run in a batch of `batch` (one model call for them
    all) waits `after_s` times that: its share of the call is what is short or not, so a call of
    64 short embeddings sends no start reports, and one that runs long sends them all."""
    return 0.0 if delivery > 1 else after_s * max(1, batch)


def run_started(item: WorkItem, worker: str, at: float, delivery: int) -> RunStarted:
    return RunStarted(
        plan_id=item.plan_id,
        task_id=item.task_id,
        attempt=item.attempt,
        worker=worker,
        at=at,
        delivery=delivery,
        claim=item.claim,
    )


def output_in_event(text: str, sensitive: bool, limit: int) -> bool:
    """Whether a run's output travels in its `run.finished`; if not, it goes to the object
    store (a sensitive task's output is never in the history)."""
    return not sensitive and len(text.encode()) <= limit


def output_to_keep(result: RunResult, sensitive: bool) -> str:
    """What is kept as a run's output: what it produced; for a sensitive shell task, whose
    report carries no stdout tail, its stdout (kept only in the object store), so that `mesh
    output --sensitive` and the tasks that take it as an input still have it."""
    if result.output or not sensitive:
        return result.output
    return result.stdout_tail


def output_object_name(item: WorkItem) -> str:
    """The object that holds an attempt's output when it is not in the event."""
    return f"outputs/{item.plan_id}/{item.task_id}/{item.attempt}"


def output_prefix(plan_id: str) -> str:
    """The names of a plan's output objects start with this."""
    return f"outputs/{plan_id}/"


def output_cut(text: str, sensitive: bool, limit: int) -> str:
    """What the event holds of an output that could not be stored as an object."""
    return "" if sensitive else text[:limit]


def run_finished(
    item: WorkItem,
    result: RunResult,
    *,
    worker: str,
    at: float,
    started_at: float,
    sensitive: bool,
    output: str,
    output_object: str,
    prompt_limit: int,
    gpu: str,
    files: tuple[FileRef, ...] = (),
    output_sha256: str = "",
    then: WorkItem | None = None,
) -> RunFinished:
    """The report of a run: what a sensitive run saw or wrote (its tails, its prompt, an error
    that quotes its answer) left out;
    with `then`, the item of the dependent the worker started as it succeeded (`continuation`)."""
    return RunFinished(
        plan_id=item.plan_id,
        task_id=item.task_id,
        attempt=item.attempt,
        worker=worker,
        at=at,
        started_at=started_at,
        ok=result.ok,
        duration_s=result.duration_s,
        rc=result.rc,
        timed_out=result.timed_out,
        cancelled=result.cancelled,
        error=(result.error_withheld or result.error) if sensitive else result.error,
        stdout_tail="" if sensitive else result.stdout_tail,
        stderr_tail="" if sensitive else result.stderr_tail,
        stdout_bytes=result.stdout_bytes,
        stderr_bytes=result.stderr_bytes,
        reason=FailReason.DEFINITION if result.definition_error else FailReason.NONE,
        output=output,
        output_object=output_object,
        output_sha256=output_sha256,
        prompt="" if sensitive else result.prompt[:prompt_limit],
        model=item.model if item.kind in MODEL_BODY_KINDS else "",
        gpu=gpu,
        metrics=result.metrics,
        artifacts=tuple(result.artifacts),
        sensitive=sensitive,
        claim=item.claim,
        parsed=result.parsed,
        files=files,
        then=then.task_id if then is not None else "",
        then_claim=then.claim if then is not None else "",
    )


def continuation(item: WorkItem, result: RunResult, cancelled: Container[str], runs: bool) -> WorkItem | None:
    """The dependent a worker starts as `item`'s run ends (its `then`, which the brain put there:
    `mesh.machine_step.continuations`): only after a success, when the worker still `runs` that
    class of work (not stopping, its lane not held) and the dependent was not cancelled. The
    report of the run says so (`run.finished`'s `then`), and the brain releases the dependent
    to this worker from it."""
    then = item.then
    if then is None or not result.ok or result.cancelled or not runs:
        return None
    if item_key(then.plan_id, then.task_id) in cancelled:
        return None
    return then


def dead_letter_report(item: WorkItem, worker: str, at: float, why: str) -> RunFinished:
    """The report that fails a dead-lettered item's task (it never started here)."""
    return RunFinished(
        plan_id=item.plan_id,
        task_id=item.task_id,
        attempt=item.attempt,
        worker=worker,
        at=at,
        ok=False,
        duration_s=0.0,
        error=why,
        dead_letter=True,
        claim=item.claim,
    )
