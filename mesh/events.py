"""Every message mesh puts on the wire, as frozen, tagged msgspec Structs.

One union (`Message`) and one decoder (`DECODER`) cover all of them: commands
on the command stream, work items on the work stream, and events on the event
stream. The tag (`type`) travels inside the JSON so that a person tailing
`mesh.evt.>` reads each payload as it is; the same value travels in the
`Mesh-Type` header.

New fields always get defaults, so an older reader keeps decoding newer
messages.
"""

from __future__ import annotations

import typing
from typing import Literal

import msgspec

from mesh.status import FailReason, PlanStatus


class Struct(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Base for plain data carried inside messages and records."""


# ---------------------------------------------------------------- plan data


TaskClass = Literal["cpu", "script", "llm", "external"]
BodyKind = Literal["shell", "noop", "prompt", "chat", "transcribe", "embed"]
TASK_CLASSES: tuple[str, ...] = ("cpu", "script", "llm", "external")
BODY_KINDS: tuple[str, ...] = ("shell", "noop", "prompt", "chat", "transcribe", "embed")
# body kinds that run a model, and the model kind each needs
MODEL_BODY_KINDS: dict[str, str] = {
    "prompt": "llm",
    "chat": "llm",
    "transcribe": "transcribe",
    "embed": "embed",
}
# the class a body kind runs in when the plan names none
DEFAULT_CLASS_OF_KIND: dict[str, str] = {
    "prompt": "llm",
    "chat": "llm",
    "transcribe": "script",
    "embed": "script",
}
# body kinds an LLM answers (class llm runs only these)
LLM_BODY_KINDS: tuple[str, ...] = ("prompt", "chat")


class TaskSpec(Struct, frozen=True, gc=False, omit_defaults=True):
    """One task as the plan defines it, after variables and foreach expansion."""

    id: str
    body: str
    kind: BodyKind = "shell"
    cls: TaskClass = msgspec.field(default="cpu", name="class")
    depends_on: tuple[str, ...] = ()
    priority: int = 5
    timeout_s: float = 1800.0
    retries: int = 3
    env: dict[str, str] = msgspec.field(default_factory=dict)
    sensitive: bool = False
    line: int = 0
    # model kinds: the model's registry name ('' = the configured default for the kind)
    model: str = ""
    # dependencies whose outputs the body takes (wrapped as untrusted data in a prompt)
    inputs: tuple[str, ...] = ()
    # prompt: most tokens to generate (0 = the model's configured max_tokens)
    max_tokens: int = 0
    # escalate to Claude instead of running locally (as class `external` does)
    requires_external: bool = False
    # the escalation ladder: the llm models a prompt task climbs to, one after another, when it
    # fails on the one before (its retries spent, or judged too hard), and `claude` (`CLAUDE`)
    # last when the gateway comes after them; () : Claude alone, by the plan's `## Escalation`
    escalate: tuple[str, ...] = ()
    # prompt, chat: a JSON Schema (as JSON text) the answer must be valid against ('' : free text)
    schema: str = ""
    # `- artifacts: GLOB`: files a task makes (relative to its working directory) that are kept
    # as its artifacts, besides the ones its body names (`save:`)
    artifacts: tuple[str, ...] = ()


class FileRef(Struct, frozen=True):
    """A file in the object store: a plan's bundled file or a task's artifact.

    `path` is where it belongs, relative to the plan's (or the task's) working directory, with
    '/' separators and no '..'; `sha256` (hex) and `size` are what a reader checks before it
    uses the copy it fetched; `object` is its name in the store ('' for a bundled file: a
    bundle's files are stored under their checksum, `mesh.bus.files.blob_name`)."""

    path: str
    size: int
    sha256: str
    object: str = ""
    # the file's permission bits (a script keeps its x)
    mode: int = 0o644


# the rung of an escalation ladder that is the gateway (Claude), not a local model
CLAUDE = "claude"


class EscalationPolicy(Struct, frozen=True):
    """A plan's `## Escalation` section: what it lets the brain hand to Claude."""

    # escalate a task that failed locally `after` times (0: the configured default, 2)
    auto: bool = False
    after: int = 0
    # sensitive tasks may be escalated at all (redacted, like everything that leaves)
    sensitive: bool = False
    # Claude may answer with follow-up tasks instead of a result
    followups: bool = True
    # a failed local attempt is reviewed by a local model first, which may escalate it
    review: bool = False
    # `- ladder:`, the escalation ladder of every prompt task that names none of its own (the
    # parser copies it into those tasks' `escalate`)
    ladder: tuple[str, ...] = ()


class PlanSpec(Struct, frozen=True):
    """A parsed, validated plan: what `mesh submit` sends to the brain."""

    title: str
    tasks: tuple[TaskSpec, ...]
    description: str = ""
    source: str = ""
    workdir: str = ""
    variables: dict[str, str] = msgspec.field(default_factory=dict)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    escalation: EscalationPolicy = msgspec.field(default_factory=EscalationPolicy)
    # the host `mesh submit` ran on (`Settings.host_id`): a worker there runs the plan's tasks in
    # `workdir` itself; any other works in a per-plan directory the bundle is copied into
    host: str = ""
    # the files under `workdir` the plan uses, travelling with it (`mesh.bus.files`): the
    # checksum of the bundle's manifest, a `BundleManifest` stored as a blob ('' : none)
    bundle: str = ""


# ---------------------------------------------------------------- messages


class Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every message on a mesh subject."""


# Commands (command stream) -------------------------------------------------


class SubmitPlan(Msg, frozen=True, tag="cmd.submit"):
    """A plan to run. A plan too big for one message travels in the object store:
    then `plan` holds only its title and `object` names it there."""

    plan_id: str
    plan: PlanSpec
    at: float
    by: str = ""
    object: str = ""


class CancelPlan(Msg, frozen=True, tag="cmd.cancel"):
    plan_id: str
    at: float
    reason: str = "cancelled by operator"


class RetryTasks(Msg, frozen=True, tag="cmd.retry"):
    """Run failed or cancelled work again: the named tasks, or every unfinished one of the plan.

    Tasks that failed or were cancelled only because of a named task are reset too.
    """

    plan_id: str
    at: float
    task_ids: tuple[str, ...] = ()


# Work (work stream) ----------------------------------------------------------


# the body kinds and task classes a packed work item may hold (`mesh.packing`)
PACK_KINDS = frozenset({"shell", "noop"})
PACK_CLASSES = frozenset({"cpu", "script"})


class WorkItem(Msg, frozen=True, tag="work"):
    plan_id: str
    task_id: str
    attempt: int
    cls: str = msgspec.field(default="cpu", name="class")
    kind: str = "shell"
    body: str = ""
    timeout_s: float = 1800.0
    env: dict[str, str] = msgspec.field(default_factory=dict)
    workdir: str = ""
    sensitive: bool = False
    model: str = ""
    inputs: tuple[str, ...] = ()
    max_tokens: int = 0
    # llm prompt: a llama.cpp GBNF grammar the answer must match ('' : free text)
    grammar: str = ""
    # prompt, chat: a JSON Schema (JSON text) the answer is generated to and checked against
    schema: str = ""
    # proof of this attempt, copied into the worker's reports (`mesh.claims`)
    claim: str = ""
    # the plan's submitting host and bundle (`PlanSpec.host`, `PlanSpec.bundle`)
    host: str = ""
    bundle: str = ""
    # the task's dependencies that may have artifacts (they declare some, or their body saves a
    # file): their artifacts are copied into the working directory first
    after: tuple[str, ...] = ()
    # `- artifacts:` globs of the task (`TaskSpec.artifacts`)
    artifacts: tuple[str, ...] = ()
    # the item of a dependent this worker starts as soon as this attempt succeeds, without
    # queueing it (`mesh.machine_step.continuations`); its own `then` may carry the next
    then: WorkItem | None = None
    # a packed item: other tasks released with this one, of the same class, that its worker runs
    # after it in the same slot, whatever its outcome, each its own attempt, claim and report
    # (`mesh.packing`); none of them carries `then` or `more`
    more: tuple[WorkItem, ...] = ()


class ResourceItem(Msg, frozen=True, tag="resource"):
    """An internal resource task: the brain tells one worker to load or unload a model.

    Travels on that worker's own work subject, ahead of any task work it takes."""

    rid: str
    worker: str
    action: Literal["load", "unload"]
    model: str
    at: float
    reason: str = ""
    # a load: the VRAM the brain placed the model for (its learned figure, or the registry's);
    # 0 from a brain that does not say, and the worker goes by its registry
    vram_mb: int = 0


# Worker reports (event stream, consumed by the brain) -------------------------


class RunStarted(Msg, frozen=True, tag="run.started"):
    plan_id: str
    task_id: str
    attempt: int
    worker: str
    at: float
    delivery: int = 1
    # the claim of the work item this reports on (`mesh.claims`)
    claim: str = ""


class RunFinished(Msg, frozen=True, tag="run.finished"):
    plan_id: str
    task_id: str
    attempt: int
    worker: str
    at: float
    ok: bool
    duration_s: float
    rc: int | None = None
    # when the worker began the attempt; a task that ended before its `run.started` was due
    # reports its start only here (0: not started, e.g. a dead letter)
    started_at: float = 0.0
    timed_out: bool = False
    cancelled: bool = False
    error: str = ""
    stdout_tail: str = ""
    stderr_tail: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    dead_letter: bool = False
    # 'definition' when the task can never run as defined (no retry helps), e.g. a prompt
    # longer than the model's context window
    reason: FailReason = FailReason.NONE
    # what a model task produced (also a shell task's stdout tail); too big for an event,
    # or the task is sensitive: only in the object store, under `output_object`
    output: str = ""
    output_object: str = ""
    prompt: str = ""
    model: str = ""
    gpu: str = ""
    # tokens_in, tokens_out, ttft_s, tokens_per_s, segments, vectors, dim, ...
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    artifacts: tuple[str, ...] = ()
    # the task was sensitive, or read a sensitive task's output: nothing it saw or made is here
    sensitive: bool = False
    # the claim of the work item this reports on (`mesh.claims`)
    claim: str = ""
    # the task has a schema and its output is JSON valid against it
    parsed: bool = False
    # the files it made, stored in the object store under the attempt (`mesh.bus.files`)
    files: tuple[FileRef, ...] = ()
    # the SHA-256 (hex) of the output under `output_object`: a reader checks the stored copy
    # against it (any worker may write the object store; only this worker could send this)
    output_sha256: str = ""
    # the dependent this worker started as this attempt succeeded (its item's `then`), and that
    # item's claim: the brain releases it to this worker, already running ('' : none)
    then: str = ""
    then_claim: str = ""


# GPUs (event stream; the brain reads them for placement) ---------------------


GPU_STATES: tuple[str, ...] = (
    "idle",
    "booting_llm",
    "llm_ready",
    "llm_busy",
    "booting_script",
    "script_busy",
    "fetching",
    "paused",
    "offline",
)


class GpuState(Msg, frozen=True, tag="gpu.state"):
    """A GPU (or a worker's CPU standing in for one) changed state. Written by its worker alone.

    `took_s` is how long the previous state lasted (a load's time, for `booting_llm`)."""

    gpu: str
    worker: str
    host: str
    state: str
    at: float
    previous: str = ""
    took_s: float = 0.0
    index: int = -1
    name: str = ""
    device: str = "cpu"
    llm: str = ""
    script_models: tuple[str, ...] = ()
    vram_total_mb: int = 0
    vram_used_mb: int = 0
    vram_reserved_mb: int = 0
    llm_slots: int = 1
    script_slots: int = 1
    running: int = 0
    rid: str = ""
    error: str = ""
    # why a paused GPU takes no work (a thermal or operator pause, a cordon)
    hold: str = ""
    # the GPUs (NVML indices) this is: one, or a set one worker owns as one GPU (`index` is the
    # first; the vram figures are the set's sums); () for a CPU standing in, or an older worker
    indices: tuple[int, ...] = ()
    # while `fetching`: the model whose file comes from the models bucket, and how much of it
    # has arrived (0 to 1)
    fetching: str = ""
    progress: float = 0.0


class GpuControl(Msg, frozen=True, tag="gpu.control"):
    """Stop (or let again) a GPU's worker claiming work. `source` is who decided: the host's
    watchdog (`thermal`) or an operator (`operator`); each writes only its own key of the GPU
    in the control bucket, so a thermal resume never lifts an operator's pause or cordon."""

    gpu: str
    source: Literal["thermal", "operator"]
    at: float
    paused: bool = False
    # an operator's mark for a GPU not to be used until uncordoned (e.g. it reports XID errors)
    cordoned: bool = False
    reason: str = ""
    by: str = ""


class GpuPower(Msg, frozen=True, tag="gpu.power"):
    """A GPU's power cap. An operator's (`mesh gpu power`, source `operator`) asks for `watts`
    (0: back to the config's cap) and is kept under the GPU's `power` key of the control bucket,
    which only the CLI may write; its host's watchdog answers (source `watchdog`, the same
    `rid`) with the limit it set and read back (`limit_w`), the card's range, or `error`. The
    watchdog also says so when it sets a cap itself: at start, after a config reload, after a
    driver reset put the default back (`reason`)."""

    gpu: str
    source: Literal["operator", "watchdog"]
    at: float
    watts: float = 0.0
    rid: str = ""
    limit_w: float | None = None
    min_w: float | None = None
    max_w: float | None = None
    default_w: float | None = None
    error: str = ""
    reason: str = ""
    by: str = ""


class ResourceRequested(Msg, frozen=True, tag="gpu.requested"):
    """The brain asked a worker to load or unload a model, and why."""

    gpu: str
    worker: str
    action: str
    model: str
    rid: str
    at: float
    reason: str = ""


# Escalation (request stream to the gateway; its answers on the event stream) -----


class LocalAttempt(Struct, frozen=True):
    """One local attempt at a task, as an escalation carries it to Claude."""

    attempt: int
    worker: str = ""
    error: str = ""
    rc: int | None = None
    reason: FailReason = FailReason.NONE
    output: str = ""


class EscalationRequest(Msg, frozen=True, tag="esc.request"):
    """The brain hands a task to the gateway (subject `<p>.esc.<plan>.<task>`, stream
    `<P>_ESC`, which only the brain may publish to).

    `why`: `external` (the task's class), `requires_external` (its flag), `local_failures`
    (it failed locally N times and its plan allows automatic escalation) or `review` (the
    brain's local reviewer judged it beyond the local models). `inputs` are its
    dependencies' outputs, untrusted data. `rid` names this request: the gateway answers
    each rid once."""

    rid: str
    plan_id: str
    task_id: str
    attempt: int
    at: float
    why: str
    task: TaskSpec
    attempts: tuple[LocalAttempt, ...] = ()
    inputs: dict[str, str] = msgspec.field(default_factory=dict)
    # the plan allows Claude to answer with follow-up tasks instead of a result
    followups_allowed: bool = True
    # the task is sensitive and its plan allows escalating it anyway
    sensitive_allowed: bool = False


class EscalationAnswered(Msg, frozen=True, tag="esc.answered"):
    """Claude answered (`<p>.evt.esc.<plan>.<task>.answered`, by the gateway): a result, or
    follow-up tasks (plan-format markdown the brain validates like any plan's tasks)."""

    rid: str
    plan_id: str
    task_id: str
    attempt: int
    at: float
    model: str
    result: str = ""
    followups: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    duration_s: float = 0.0
    # what was redacted from the request, per kind (see mesh/redact.py)
    redacted: dict[str, int] = msgspec.field(default_factory=dict)
    request_id: str = ""
    # the request as sent, after redaction (empty when the task was sensitive)
    prompt: str = ""
    system: str = ""
    stop_reason: str = ""


class EscalationWaiting(Msg, frozen=True, tag="esc.waiting"):
    """The gateway could not get an answer yet (offline, 429, 5xx, rate limit) and tries
    again at `retry_at`."""

    rid: str
    plan_id: str
    task_id: str
    attempt: int
    at: float
    retry_at: float
    reason: str
    tries: int = 1


class EscalationFailed(Msg, frozen=True, tag="esc.failed"):
    """No answer will come: `reason` is `budget`, `sensitive`, `refused` (a 4xx other than
    429) or `error`."""

    rid: str
    plan_id: str
    task_id: str
    attempt: int
    at: float
    reason: FailReason
    error: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0


# Brain transitions (event stream; the history replay folds over) -------------


class PlanAccepted(Msg, frozen=True, tag="plan.accepted"):
    """A plan the brain took on. A big plan's tasks follow in `plan.tasks` events: `plan`
    holds the first part and `total` counts them all."""

    plan_id: str
    plan: PlanSpec
    at: float
    submitted_at: float = 0.0
    by: str = ""
    total: int = -1


class PlanTasks(Msg, frozen=True, tag="plan.tasks"):
    """More tasks of an accepted plan (a plan too big for one event is accepted in parts)."""

    plan_id: str
    part: int
    tasks: tuple[TaskSpec, ...]
    at: float


class PlanRejected(Msg, frozen=True, tag="plan.rejected"):
    """A submission the brain could not accept (it never reached the queue)."""

    plan_id: str
    at: float
    error: str
    title: str = ""
    source: str = ""


class PlanFinished(Msg, frozen=True, tag="plan.finished"):
    plan_id: str
    status: PlanStatus
    at: float
    counts: dict[str, int] = msgspec.field(default_factory=dict)


class TaskWaiting(Msg, frozen=True, tag="task.waiting"):
    """Every dependency succeeded: the task waits for a release slot. (Not an event of its own
    for a task released in the same step, whose `task.released` carries it, nor for a task that
    depends on nothing, whose acceptance says it waits.)"""

    plan_id: str
    task_id: str
    at: float


class TaskReleased(Msg, frozen=True, tag="task.released"):
    plan_id: str
    task_id: str
    attempt: int
    at: float
    # not 0: the task began waiting in the same step, at this time (its `task.waiting`)
    waited_at: float = 0.0
    # released to this worker, which ran its dependency and started it at once (a `task.started`
    # follows): no work item is queued for it ('' : queued for any worker)
    worker: str = ""


class TaskStarted(Msg, frozen=True, tag="task.started"):
    """The attempt's worker reported its start. (A start decided from the same `run.finished` as
    the attempt's end is no event of its own: the end's `started_at` carries it.)"""

    plan_id: str
    task_id: str
    attempt: int
    worker: str
    at: float


class TaskRedelivered(Msg, frozen=True, tag="task.redelivered"):
    """The same attempt, delivered again after its worker stopped heartbeating."""

    plan_id: str
    task_id: str
    attempt: int
    worker: str
    at: float
    previous_worker: str = ""
    delivery: int = 2


class TaskSucceeded(Msg, frozen=True, tag="task.succeeded"):
    plan_id: str
    task_id: str
    attempt: int
    worker: str
    at: float
    duration_s: float = 0.0
    rc: int | None = 0
    # an LLM task's time to its first token (its run's `ttft_s`), so its record keeps it
    ttft_s: float = 0.0
    # not 0: the attempt started with this report too, at this time (its `task.started`)
    started_at: float = 0.0
    # the dependent its worker started as it succeeded (`run.finished`'s `then`), released to
    # that worker and started there ('' : none). Its own `task.released` and `task.started`
    # follow; this event folds them too, so a brain stopped between them cannot queue it again
    then: str = ""


class TaskRetrying(Msg, frozen=True, tag="task.retrying"):
    """An attempt failed and attempts are left: it waits out its backoff."""

    plan_id: str
    task_id: str
    attempt: int
    at: float
    retry_at: float
    reason: FailReason = FailReason.ERROR
    error: str = ""
    rc: int | None = None
    worker: str = ""
    duration_s: float = 0.0
    started_at: float = 0.0  # as in `task.succeeded`


class TaskFailed(Msg, frozen=True, tag="task.failed"):
    plan_id: str
    task_id: str
    attempt: int
    at: float
    reason: FailReason = FailReason.ERROR
    error: str = ""
    rc: int | None = None
    worker: str = ""
    duration_s: float = 0.0
    started_at: float = 0.0  # as in `task.succeeded`


class TaskCancelled(Msg, frozen=True, tag="task.cancelled"):
    plan_id: str
    task_id: str
    at: float
    attempt: int = 0
    reason: str = ""


class TaskReset(Msg, frozen=True, tag="task.reset"):
    """An operator's retry: a failed or cancelled task starts over with a fresh retry budget."""

    plan_id: str
    task_id: str
    attempt: int
    at: float


class TaskEscalated(Msg, frozen=True, tag="task.escalated"):
    """The brain handed the task to the gateway (request `rid`): it waits on escalation.

    `why` as in `EscalationRequest`. The escalation counts as an attempt."""

    plan_id: str
    task_id: str
    attempt: int
    at: float
    rid: str
    why: str
    # the failed local attempt that led here (escalation after local failures)
    after: LocalAttempt | None = None


class TaskClimbed(Msg, frozen=True, tag="task.climbed"):
    """A task climbed its escalation ladder: its attempt `attempt` failed on its model
    (`from_model`) for good (`why` `local_failures`: its retries on that model spent, or its
    plan's automatic escalation after N failures) or a review judged it too hard (`why`
    `review`), and it waits to run next on the ladder's rung `tier` (1 : the first of the task's
    `escalate`), the llm `model`. Its retries count afresh on the new model."""

    plan_id: str
    task_id: str
    attempt: int
    at: float
    tier: int
    model: str
    from_model: str = ""
    why: str = ""
    # the failed local attempt that led here
    after: LocalAttempt | None = None
    duration_s: float = 0.0


class TaskReviewing(Msg, frozen=True, tag="task.reviewing"):
    """A local attempt failed in a plan with `review: true`: before the failure takes its course
    (`then`: `retry` or `fail`), a local model reviews whether Claude should have the task.

    The review runs as the task's next attempt (a work item of class llm on `model`, with the
    prompt of `mesh.review`): the task is `ready`, then `running`, like any attempt. It is not
    one of the task's own tries: it does not count against its retries or its escalation's
    `after`."""

    plan_id: str
    task_id: str
    attempt: int
    at: float
    model: str
    # the failed attempt under review, and what follows it unless the review escalates
    failed: LocalAttempt
    then: str
    duration_s: float = 0.0


class TaskReviewed(Msg, frozen=True, tag="task.reviewed"):
    """The review's outcome: `verdict` `escalate` (a `task.escalated`, why `review`, follows) or
    `retry` (the failure takes its course: `task.retrying` or `task.failed`). '' when the
    review failed or its answer was neither: the failure takes its course too."""

    plan_id: str
    task_id: str
    attempt: int
    at: float
    verdict: str
    answer: str = ""
    error: str = ""
    worker: str = ""


class TaskFollowups(Msg, frozen=True, tag="task.followups"):
    """Claude answered an escalated task with follow-up tasks: the brain validated them like a
    plan's tasks and adds them to the plan. The escalated task succeeds when they all have
    (and fails with reason `dependency` if one fails)."""

    plan_id: str
    task_id: str
    attempt: int
    at: float
    tasks: tuple[TaskSpec, ...]
    rid: str = ""


class PlanResumed(Msg, frozen=True, tag="plan.resumed"):
    plan_id: str
    at: float


class PlanArchived(Msg, frozen=True, tag="plan.archived"):
    """A plan final for longer than the retention period leaves the current state (KV and the
    brain's memory); its history stays in the event stream."""

    plan_id: str
    at: float


# Agents and bad input --------------------------------------------------------


class AgentStarted(Msg, frozen=True, tag="agent.started"):
    agent_id: str
    role: str
    host: str
    pid: int
    at: float


class AgentStopped(Msg, frozen=True, tag="agent.stopped"):
    agent_id: str
    role: str
    at: float
    reason: str = ""


class AgentOffline(Msg, frozen=True, tag="agent.offline"):
    """The brain saw an agent's registration expire: it stopped heartbeating."""

    agent_id: str
    at: float
    running: tuple[str, ...] = ()


class DeadLetter(Msg, frozen=True, tag="dead.letter"):
    """A message an agent could not use; kept so nothing vanishes silently.

    For an unreadable KV value (a task or plan record) `subject` is its `$KV.<bucket>.<key>`,
    and `bucket` and `key` name it; `payload` is the base64 of the first bytes either way."""

    agent_id: str
    subject: str
    reason: str
    at: float
    size: int = 0
    payload: str = ""
    bucket: str = ""
    key: str = ""


# Alerts (event stream; written by a host's watchdog) ---------------------------


class AlertRaised(Msg, frozen=True, tag="alert.raised"):
    """A watchdog rule fired on a target (a GPU `<host>-gpu<N>`, a host, an agent id)."""

    rule: str
    target: str
    host: str
    severity: str
    at: float
    metric: str = ""
    value: float = 0.0
    threshold: float = 0.0
    message: str = ""


class AlertResolved(Msg, frozen=True, tag="alert.resolved"):
    """A raised alert's condition cleared (past its threshold by the rule's hysteresis)."""

    rule: str
    target: str
    host: str
    severity: str
    at: float
    raised_at: float = 0.0
    metric: str = ""
    value: float = 0.0
    threshold: float = 0.0
    message: str = ""


Message = (
    SubmitPlan
    | CancelPlan
    | RetryTasks
    | WorkItem
    | ResourceItem
    | RunStarted
    | RunFinished
    | PlanAccepted
    | PlanTasks
    | PlanRejected
    | PlanFinished
    | PlanResumed
    | PlanArchived
    | TaskWaiting
    | TaskReleased
    | TaskStarted
    | TaskRedelivered
    | TaskSucceeded
    | TaskRetrying
    | TaskFailed
    | TaskCancelled
    | TaskReset
    | TaskEscalated
    | TaskFollowups
    | TaskReviewing
    | TaskReviewed
    | TaskClimbed
    | AgentStarted
    | AgentStopped
    | AgentOffline
    | GpuState
    | GpuControl
    | GpuPower
    | ResourceRequested
    | AlertRaised
    | AlertResolved
    | EscalationRequest
    | EscalationAnswered
    | EscalationWaiting
    | EscalationFailed
    | DeadLetter
)

TaskTransition = (
    TaskWaiting
    | TaskReleased
    | TaskStarted
    | TaskRedelivered
    | TaskSucceeded
    | TaskRetrying
    | TaskFailed
    | TaskCancelled
    | TaskReset
    | TaskEscalated
    | TaskFollowups
    | TaskReviewing
    | TaskReviewed
    | TaskClimbed
)

# Everything the brain publishes that changes a record: what `mesh.machine.evolve` folds, and
# so what replay and the brain's catch-up after a crash must read back.
Transition = (
    PlanAccepted | PlanTasks | PlanRejected | PlanFinished | PlanResumed | PlanArchived | TaskTransition
)
TRANSITION_TYPES: tuple[type[Msg], ...] = typing.get_args(Transition)

DECODER: msgspec.json.Decoder[Message] = msgspec.json.Decoder(Message)
ENCODER = msgspec.json.Encoder()


def encode(msg: Msg) -> bytes:
    return ENCODER.encode(msg)


def decode(data: bytes) -> Message:
    """Decode one message; raises `msgspec.DecodeError` (or ValidationError) on bad input."""
    return DECODER.decode(data)


def type_of(msg: Msg) -> str:
    tag = msg.__struct_config__.tag
    assert isinstance(tag, str)
    return tag
