"""Every subject, stream, consumer, bucket and header name mesh uses.

Nothing else in mesh writes a subject string: it asks a `Names`. The prefix
(default `mesh`) lets several independent meshes share one server. The files in
`nats/` are rendered from these names (`mesh init --write-config`), and a test
checks they agree.

Subjects
    <p>.cmd.submit                     plan submissions           (command stream)
    <p>.cmd.cancel.<plan>              cancel requests            (command stream)
    <p>.cmd.retry.<plan>               retry requests             (command stream)
    <p>.work.<class>                   tasks ready to run         (work stream)
    <p>.work.llm.<model>               LLM tasks for GPUs holding <model>
    <p>.work.to.<worker>               resource tasks (model loads/unloads) for one worker
    <p>.evt.plan.<plan>.<type>         plan transitions           (event stream)
    <p>.evt.task.<plan>.<task>.<type>  task transitions by the brain
    <p>.evt.run.<plan>.<task>.<type>.<worker>  what a worker reports (only under its own id)
    <p>.evt.agent.<agent>.<type>       agents starting and stopping
    <p>.evt.gpu.<gpu>.<type>           GPU state changes (by its worker), loads asked (by the brain)
    <p>.evt.dead.<agent>               dead letters: messages nobody could use
    <p>.evt.alert.<rule>.<type>        alerts raised and resolved by a host's watchdog
    <p>.esc.<plan>.<task>              escalation requests, brain -> gateway (escalation stream)
    <p>.evt.esc.<plan>.<task>.<type>   the gateway's answers, waits and failures
    (bucket <p>-gateway: the gateway's spend, final answers and budget alerts; consumer `gateway` on <P>_ESC)
    <p>.tel.gpu.<host>.<index>         a GPU's telemetry sample   (core NATS, not stored)
    <p>.tel.host.<host>                a host's telemetry sample  (core NATS, not stored)
    <p>.hist.<res>.gpu.<host>.<index>  a GPU's telemetry averaged over <res> seconds (history stream)
    <p>.hist.<res>.host.<host>         a host's, likewise
    <p>.ask.<asker>                    an operator question's next turn, asked of the gateway
                                       (request/reply, core NATS; docs/operator.md)
    <p>.stream.<plan>.<task>.<worker>  a prompt's answer as it is generated (core NATS, not stored;
                                       only under the worker's own id, like its reports)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.errors import BadName

HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_TYPE = "Mesh-Type"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")

# A KV write is a publish on `$KV.<bucket>.<key>` (whatever the prefix: the server names it)
KV_SUBJECTS = "$KV."
# an object store's chunks and entries are publishes on `$O.<bucket>.C.<id>` and `$O.<bucket>.M.<name>`
OBJECT_SUBJECTS = "$O."


def kv_keys(bucket: str) -> str:
    """What every key's subject of one bucket starts with: `$KV.<bucket>.`."""
    return f"{KV_SUBJECTS}{bucket}."


def kv_subject(bucket: str, key: str) -> str:
    """The subject a put or purge of `key` in `bucket` is published on (`key` may be a pattern)."""
    return kv_keys(bucket) + key


def check_token(value: str, what: str) -> str:
    """A subject token must not contain '.', '*', '>' or whitespace."""
    if not _TOKEN.match(value):
        raise BadName(f"{what} {value!r} may hold only letters, digits, '_' and '-'")
    return value


def _token_or_any(value: str, what: str) -> str:
    """A subject token, or `*` (a filter over every value)."""
    return value if value == "*" else check_token(value, what)


# every user's replies arrive under its own inbox prefix, which no other user may read
INBOX_ROOT = "_INBOX"


def inbox_prefix(user: str) -> str:
    """The inbox prefix of a NATS user: where its replies arrive, under its own name."""
    return f"{INBOX_ROOT}.{check_token(user, 'NATS user')}"


@dataclass(frozen=True)
class Names:
    prefix: str = "mesh"

    def __post_init__(self) -> None:
        check_token(self.prefix, "prefix")

    # streams ---------------------------------------------------------------
    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def work_stream(self) -> str:
        return f"{self.prefix.upper()}_WORK"

    @property
    def cmd_stream(self) -> str:
        return f"{self.prefix.upper()}_CMD"

    @property
    def esc_stream(self) -> str:
        """Escalation requests: only the brain publishes here, only the gateway consumes."""
        return f"{self.prefix.upper()}_ESC"

    # buckets -----------------------------------------------------------------
    @property
    def tasks_bucket(self) -> str:
        return f"{self.prefix}-tasks"

    @property
    def plans_bucket(self) -> str:
        return f"{self.prefix}-plans"

    @property
    def agents_bucket(self) -> str:
        return f"{self.prefix}-agents"

    @property
    def brain_bucket(self) -> str:
        return f"{self.prefix}-brain"

    @property
    def gpu_control_bucket(self) -> str:
        """`<gpu>.thermal` (its host's watchdog) and `<gpu>.operator` (mesh gpu ...) -> a
        `gpu.control`: whether the GPU's worker may claim work; `<gpu>.power` (mesh gpu power)
        -> a `gpu.power`: the operator's power cap, which the host's watchdog sets."""
        return f"{self.prefix}-gpu-control"

    @staticmethod
    def gpu_control_key(gpu: str, source: str) -> str:
        return f"{check_token(gpu, 'gpu id')}.{check_token(source, 'control source')}"

    @property
    def gpus_bucket(self) -> str:
        """GPU id -> its latest `gpu.state` (written by that GPU's worker alone)."""
        return f"{self.prefix}-gpus"

    @property
    def telemetry_bucket(self) -> str:
        """`<host>.gpu<index>` / `<host>.host` -> the latest telemetry sample (by that host's watchdog)."""
        return f"{self.prefix}-telemetry"

    @property
    def objects_bucket(self) -> str:
        """Object store for what is too big for one message (big plans; later, task outputs)."""
        return f"{self.prefix}-objects"

    @property
    def models_bucket(self) -> str:
        """Object store of model files pushed with `mesh models push` (kept until removed)."""
        return f"{self.prefix}-models"

    # consumers ---------------------------------------------------------------
    @property
    def brain_cmd_consumer(self) -> str:
        return "brain-cmd"

    @property
    def brain_runs_consumer(self) -> str:
        return "brain-runs"

    @property
    def brain_esc_consumer(self) -> str:
        """The brain's consumer of the gateway's answers (`<p>.evt.esc.>`)."""
        return "brain-esc"

    @property
    def auditor_consumer(self) -> str:
        return "auditor"

    def audited_subjects(self) -> list[str]:
        """Event subjects no other agent consumes: the auditor checks them."""
        return [
            self.plan_events_all,
            self.task_events_all,
            self.agent_events_all,
            self.gpu_requests_all,
            self.gpu_controls_all,
            self.alerts_all,
        ]

    def workers_consumer(self, cls: str) -> str:
        return f"workers-{check_token(cls, 'class')}"

    def llm_consumer(self, model: str) -> str:
        """Shared by the workers whose GPU holds `model`."""
        return f"workers-llm-{check_token(model, 'model name')}"

    def own_consumer(self, worker: str) -> str:
        """One worker's own queue of resource tasks."""
        return f"worker-{check_token(worker, 'worker id')}"

    # subjects: whole spaces ------------------------------------------------------
    @property
    def cmd_all(self) -> str:
        return f"{self.prefix}.cmd.>"

    @property
    def work_all(self) -> str:
        return f"{self.prefix}.work.>"

    @property
    def evt_all(self) -> str:
        return f"{self.prefix}.evt.>"

    @property
    def evt_prefix(self) -> str:
        """What every event subject starts with."""
        return f"{self.prefix}.evt."

    @property
    def work_prefix(self) -> str:
        """What every work stream subject starts with."""
        return f"{self.prefix}.work."

    @property
    def runs_all(self) -> str:
        return f"{self.prefix}.evt.run.>"

    @property
    def plan_events_all(self) -> str:
        return f"{self.prefix}.evt.plan.>"

    @property
    def task_events_all(self) -> str:
        """The brain's task transitions, every plan."""
        return f"{self.prefix}.evt.task.>"

    @property
    def agent_events_all(self) -> str:
        return f"{self.prefix}.evt.agent.>"

    @property
    def agent_events_each(self) -> str:
        """`<p>.evt.agent.<agent>.<kind>` for any agent and kind (exactly two tokens after `agent`)."""
        return f"{self.prefix}.evt.agent.*.*"

    @property
    def gpu_requests_all(self) -> str:
        """The brain asking any GPU's worker to load or unload a model."""
        return f"{self.prefix}.evt.gpu.*.requested"

    @property
    def gpu_controls_all(self) -> str:
        """Any GPU paused, resumed, cordoned or uncordoned."""
        return f"{self.prefix}.evt.gpu.*.control"

    @property
    def gpu_power_all(self) -> str:
        """Any GPU's power cap asked for (an operator) or set (its host's watchdog)."""
        return f"{self.prefix}.evt.gpu.*.power"

    POWER_KEY = "power"

    @property
    def gpu_states_all(self) -> str:
        """Every GPU's state changes (what the brain places models by)."""
        return f"{self.prefix}.evt.gpu.*.state"

    @property
    def agent_stopped_all(self) -> str:
        """Every clean agent stop (the watchdog stops watching an agent's heartbeat)."""
        return f"{self.prefix}.evt.agent.*.stopped"

    @property
    def alerts_all(self) -> str:
        return f"{self.prefix}.evt.alert.>"

    @property
    def telemetry_all(self) -> str:
        return f"{self.prefix}.tel.>"

    @property
    def task_cancelled_all(self) -> str:
        return f"{self.prefix}.evt.task.*.*.cancelled"

    @property
    def dead_all(self) -> str:
        return f"{self.prefix}.evt.dead.>"

    # subjects: one message -------------------------------------------------------
    @property
    def submit(self) -> str:
        return f"{self.prefix}.cmd.submit"

    def cancel(self, plan_id: str) -> str:
        return f"{self.prefix}.cmd.cancel.{check_token(plan_id, 'plan id')}"

    def retry(self, plan_id: str) -> str:
        return f"{self.prefix}.cmd.retry.{check_token(plan_id, 'plan id')}"

    @property
    def plan_commands(self) -> tuple[str, ...]:
        """Submit, cancel and retry, of any plan: the commands the web console sends (and no
        command added later)."""
        return (self.submit, f"{self.prefix}.cmd.cancel.*", f"{self.prefix}.cmd.retry.*")

    def work(self, cls: str) -> str:
        return f"{self.prefix}.work.{check_token(cls, 'class')}"

    def work_llm(self, model: str) -> str:
        return f"{self.prefix}.work.llm.{check_token(model, 'model name')}"

    def work_to(self, worker: str) -> str:
        return f"{self.prefix}.work.to.{check_token(worker, 'worker id')}"

    def gpu_event(self, gpu: str, kind: str) -> str:
        return f"{self.prefix}.evt.gpu.{check_token(gpu, 'gpu id')}.{kind}"

    def plan_event(self, plan_id: str, kind: str) -> str:
        return f"{self.prefix}.evt.plan.{plan_id}.{kind}"

    def task_event(self, plan_id: str, task_id: str, kind: str) -> str:
        return f"{self.prefix}.evt.task.{plan_id}.{task_id}.{kind}"

    def run_event(self, plan_id: str, task_id: str, kind: str, worker: str) -> str:
        """A worker's report on a task. The worker's id is the last token, so a worker's NATS
        user may be allowed `<p>.evt.run.*.*.*.<its id>` alone, and `evt.*.<plan>.>` still
        gathers every event of a plan."""
        return f"{self.prefix}.evt.run.{plan_id}.{task_id}.{kind}.{check_token(worker, 'worker id')}"

    def run_events(self, plan_id: str = "*", task_id: str = "*", kind: str = "*") -> str:
        """Every worker's reports of a kind on a task (`*` for any plan, task or kind)."""
        return f"{self.prefix}.evt.run.{plan_id}.{task_id}.{kind}.*"

    def runs_by(self, worker: str) -> str:
        """Every report one worker may publish (its NATS permission)."""
        return f"{self.prefix}.evt.run.*.*.*.{check_token(worker, 'worker id')}"

    def agent_event(self, agent_id: str, kind: str) -> str:
        return f"{self.prefix}.evt.agent.{agent_id}.{kind}"

    def dead_letter(self, agent_id: str) -> str:
        return f"{self.prefix}.evt.dead.{agent_id}"

    def alert_event(self, rule: str, kind: str) -> str:
        return f"{self.prefix}.evt.alert.{check_token(rule, 'alert rule')}.{kind}"

    def escalation(self, plan_id: str, task_id: str) -> str:
        return f"{self.prefix}.esc.{plan_id}.{task_id}"

    @property
    def esc_all(self) -> str:
        return f"{self.prefix}.esc.>"

    def esc_event(self, plan_id: str, task_id: str, kind: str) -> str:
        return f"{self.prefix}.evt.esc.{plan_id}.{task_id}.{kind}"

    @property
    def esc_events_all(self) -> str:
        return f"{self.prefix}.evt.esc.>"

    # escalation: the gateway's own resources ------------------------------------------
    @property
    def gateway_consumer(self) -> str:
        """The gateway's durable consumer on the escalation stream."""
        return "gateway"

    @property
    def gateway_bucket(self) -> str:
        """The gateway's state: spend per day and per plan, and each request's final answer."""
        return f"{self.prefix}-gateway"

    @staticmethod
    def gateway_spend_key(scope: str, name: str) -> str:
        """`day.<YYYY-MM-DD>` or `plan.<plan>` in the gateway bucket."""
        return f"spend.{check_token(scope, 'spend scope')}.{check_token(name, 'spend name')}"

    @property
    def gateway_rate_key(self) -> str:
        """The gateway's calls of the last minute (its rate limit's log)."""
        return "rate"

    @staticmethod
    def gateway_alert_key(scope: str, name: str) -> str:
        """A budget alert the gateway raised and has not resolved (`alert.day.<date>`,
        `alert.plan.<plan>`)."""
        return f"alert.{check_token(scope, 'alert scope')}.{check_token(name, 'alert name')}"

    @staticmethod
    def gateway_done_key(plan_id: str, task_id: str, attempt: int) -> str:
        """A request's final event (answered or failed), kept so it is never asked twice."""
        return f"done.{check_token(plan_id, 'plan id')}.{check_token(task_id, 'task id')}.{int(attempt)}"

    def esc_events_of(self, kind: str) -> str:
        """Every escalation event of one kind (`answered`, `waiting`, `failed`)."""
        return f"{self.prefix}.evt.esc.*.*.{check_token(kind, 'event kind')}"

    def tel_gpu(self, host: str, index: int) -> str:
        return f"{self.prefix}.tel.gpu.{check_token(host, 'host')}.{int(index)}"

    def tel_host(self, host: str) -> str:
        return f"{self.prefix}.tel.host.{check_token(host, 'host')}"

    @staticmethod
    def telemetry_gpu_key(host: str, index: int) -> str:
        """A GPU's key in the telemetry bucket."""
        return f"{check_token(host, 'host')}.gpu{int(index)}"

    @staticmethod
    def telemetry_host_key(host: str) -> str:
        return f"{check_token(host, 'host')}.host"

    # telemetry history: samples averaged over <res> seconds, stored with a bounded age -------
    @property
    def history_stream(self) -> str:
        """Downsampled telemetry, each message kept as long as its resolution's retention."""
        return f"{self.prefix.upper()}_HISTORY"

    @property
    def history_all(self) -> str:
        return f"{self.prefix}.hist.>"

    def hist_gpu(self, res_s: int, host: str, index: int | str) -> str:
        """One GPU's points at one resolution (`index` `*`: every GPU of the host)."""
        idx = index if index == "*" else int(index)
        return f"{self.prefix}.hist.{int(res_s)}.gpu.{_token_or_any(host, 'host')}.{idx}"

    def hist_host(self, res_s: int, host: str) -> str:
        return f"{self.prefix}.hist.{int(res_s)}.host.{_token_or_any(host, 'host')}"

    # operator questions (`mesh ask`): one turn of the conversation, asked of the gateway -----
    def ask(self, asker: str) -> str:
        """Where an asker sends the next turn of its conversation (request/reply)."""
        return f"{self.prefix}.ask.{check_token(asker, 'asker')}"

    @property
    def ask_all(self) -> str:
        """What the gateway serves."""
        return f"{self.prefix}.ask.*"

    # a prompt's text as it is generated (core NATS, not stored) ----------------------
    def text(self, plan_id: str, task_id: str, worker: str) -> str:
        """Where a worker streams the answer of a task it runs. The worker's id is the last
        token, as in its reports, so its NATS user may publish under its own id alone."""
        return (
            f"{self.prefix}.stream.{check_token(plan_id, 'plan id')}.{check_token(task_id, 'task id')}"
            f".{check_token(worker, 'worker id')}"
        )

    def text_of_plan(self, plan_id: str) -> str:
        """Every streamed answer of one plan (what `mesh tail PLAN` and `--wait` subscribe to)."""
        return f"{self.prefix}.stream.{check_token(plan_id, 'plan id')}.>"

    @property
    def text_all(self) -> str:
        """Every streamed answer (what a CLI user may subscribe to)."""
        return f"{self.prefix}.stream.>"

    def text_by(self, worker: str) -> str:
        """Every streamed answer one worker may publish (its NATS permission)."""
        return f"{self.prefix}.stream.*.*.{check_token(worker, 'worker id')}"

    def plan_filter(self, plan_id: str) -> str:
        """One subject filter for every event of one plan (plan, task and run events)."""
        return f"{self.prefix}.evt.*.{check_token(plan_id, 'plan id')}.>"

    def transition_filters(self, plan_id: str | None = None) -> list[str]:
        """The brain's transitions (what replay folds), of one plan or of all."""
        plan = check_token(plan_id, "plan id") if plan_id else "*"
        return [f"{self.prefix}.evt.plan.{plan}.>", f"{self.prefix}.evt.task.{plan}.>"]

    def evt_filter(self, pattern: str) -> str:
        """A `mesh tail` filter: a subject pattern under `<p>.evt.`."""
        return f"{self.prefix}.evt.{pattern}"

    # export ----------------------------------------------------------------------
    def export_filters(self, plan_id: str | None = None) -> list[str]:
        """The events `mesh export` joins into one record per task attempt, of one plan or of
        all: plan specs and plan ends, the brain's start and final transitions of an attempt,
        the worker's report, and the gateway's answers. The rest stays on the server."""
        plan = check_token(plan_id, "plan id") if plan_id else "*"
        return [
            f"{self.prefix}.evt.plan.{plan}.accepted",
            f"{self.prefix}.evt.plan.{plan}.tasks",
            f"{self.prefix}.evt.plan.{plan}.finished",
            f"{self.prefix}.evt.task.{plan}.*.started",
            f"{self.prefix}.evt.task.{plan}.*.redelivered",
            f"{self.prefix}.evt.task.{plan}.*.succeeded",
            f"{self.prefix}.evt.task.{plan}.*.retrying",
            f"{self.prefix}.evt.task.{plan}.*.failed",
            f"{self.prefix}.evt.task.{plan}.*.cancelled",
            f"{self.prefix}.evt.task.{plan}.*.climbed",
            f"{self.prefix}.evt.run.{plan}.*.finished.*",
            f"{self.prefix}.evt.esc.{plan}.*.answered",
            f"{self.prefix}.evt.esc.{plan}.*.failed",
        ]
