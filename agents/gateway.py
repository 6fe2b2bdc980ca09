"""The gateway: the only agent that reaches the internet. It answers escalation requests with Claude.

Wiring around `mesh.escalation`. For each request on its durable consumer (stream `<P>_ESC`):

1. a request answered before (its final event is in the gateway's bucket) is answered again
   from there, never asked twice;
2. a sensitive task its plan does not allow to leave, a gateway without an API key, or a
   request older than `gateway_give_up_after_s` fails at once;
3. the request is built and redacted, and priced at its worst (the input estimated, the output
   at `gateway_max_tokens`): over the day's or the plan's budget, it fails with reason `budget`
   and an `alert.raised` (rule `escalation_budget`), kept in the bucket until it is resolved
   (`alert.resolved`: the day or the plan is over, or the budget was raised);
4. it waits for the rate limit, then calls the Messages API, heartbeating the request;
5. an answer is recorded (spend, then the final event in the bucket), published as
   `esc.answered` and acknowledged; an unreachable API, a 429 or a 5xx publishes
   `esc.waiting` and hands the request back to the server with a delay (its Retry-After, or a
   backoff), so the pending retry survives a restart of the gateway; another 4xx fails it.

It also answers operator questions (`mesh ask`, on `<p>.ask.*`: `agents.gateway_ask`) under the
same budget, rate limit and redaction.

It publishes only `<p>.evt.esc.>`, `<p>.evt.agent.>` and `<p>.evt.alert.>` events, and never
anything onto the work queue or the command stream: Claude advises the brain, which decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import anthropic
import msgspec
import nats.errors
import nats.js.errors
from anthropic.types import MessageParam, ToolChoiceAnyParam, ToolParam
from nats.aio.msg import Msg as NatsMsg

from agents.base import Agent
from agents.gateway_ask import AskServer
from mesh.bus.jetstream import TRANSIENT
from mesh.bus.pull import pull_subscribe
from mesh.bus.read import fetch_some, read_bucket
from mesh.bus.route import decode_checked
from mesh.errors import MeshError
from mesh.escalation import (
    AnswerError,
    BudgetAlert,
    Prepared,
    RateLimiter,
    Spend,
    budget_cleared,
    cost_usd,
    prepare,
    read_answer,
    usage_tokens,
    utc_day,
)
from mesh.escalation import backoff_s as esc_backoff_s
from mesh.escalation import retry_after_s as esc_retry_after_s
from mesh.events import (
    AlertRaised,
    AlertResolved,
    EscalationAnswered,
    EscalationFailed,
    EscalationRequest,
    EscalationWaiting,
    decode,
    encode,
    type_of,
)
from mesh.records import PLAN_FINAL_STATES, decode_plan
from mesh.redact import Redactor
from mesh.settings import Settings
from mesh.status import FailReason

log = logging.getLogger("mesh.gateway")

BUDGET_RULE = "escalation_budget"
# statuses worth asking again: rate limited, overloaded, server errors, timeouts
RETRY_STATUSES = frozenset({408, 409, 429})
# on stop, in-flight calls get this long to finish before they are handed back
DRAIN_S = 20.0
_spend_decoder = msgspec.json.Decoder(Spend)
_alert_decoder = msgspec.json.Decoder(BudgetAlert)


@dataclass(frozen=True)
class Wait:
    """No answer yet: try again after `delay_s`."""

    delay_s: float
    reason: str


class Gateway(Agent):
    role = "gateway"

    def __init__(self, settings: Settings, agent_id: str | None = None) -> None:
        super().__init__(settings, agent_id)
        self.redactor = Redactor(settings.redact)
        self.price = settings.price_table()[settings.gateway_model]
        self.client: anthropic.AsyncAnthropic | None = None
        self.handlers: set[asyncio.Task[None]] = set()
        # requests being handled here, and the worst-case cost each has reserved, by spend key
        self.busy: set[str] = set()
        self.reserved: dict[str, float] = {}
        self.slots = settings.gateway_concurrency
        # budget alerts found still holding (logged once each)
        self.alerts_seen: set[str] = set()
        # plans whose record was found unreadable (each said once)
        self._damaged_seen: set[str] = set()

    def running_keys(self) -> list[str]:
        return sorted(self.busy)

    # start -----------------------------------------------------------------------------
    async def ensure_resources(self) -> None:
        await self.bus.ensure_gateway_resources()

    async def start(self) -> None:
        await super().start()
        s = self.settings
        if s.gateway_api_key:
            self.client = anthropic.AsyncAnthropic(
                api_key=s.gateway_api_key,
                base_url=s.gateway_base_url or None,
                max_retries=0,  # mesh retries, with the request safe in the stream meanwhile
                timeout=s.gateway_timeout_s,
            )
        else:
            log.warning(
                "no Anthropic API key: escalations will fail with reason 'config'. Set ANTHROPIC_API_KEY "
                "in the gateway's environment or gateway_api_key in the config, and restart the gateway"
            )
        # operator questions (`mesh ask`), beside the escalations (agents.gateway_ask)
        await AskServer(self).start()
        self.sub = await pull_subscribe(
            self.bus.js, durable=self.names.gateway_consumer, stream=self.names.esc_stream
        )
        log.info(
            "gateway: model %s at %s, budget %s/day %s/plan, %s requests and %s tokens a minute",
            s.gateway_model,
            s.gateway_base_url or "the API's default address",
            _usd_limit(s.gateway_budget_day_usd),
            _usd_limit(s.gateway_budget_plan_usd),
            s.gateway_requests_per_min or "any",
            s.gateway_tokens_per_min or "any",
        )

    # run ---------------------------------------------------------------------------------
    async def run(self) -> None:
        next_check = 0.0
        while not self.stop_requested.is_set():
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.settings.gateway_alert_check_s
                try:
                    await self.check_budget_alerts()
                except TRANSIENT as exc:
                    if not self.bus.store.full:  # (the bus said that once)
                        log.warning("checking the budget alerts failed (%r); trying again later", exc)
            free = self.settings.gateway_concurrency - len(self.handlers)
            if free <= 0:
                await asyncio.wait(set(self.handlers), timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                continue
            for raw in await fetch_some(self.sub, free, "escalation requests", store=self.bus.store):
                task = asyncio.get_running_loop().create_task(self.handle(raw), name=f"esc:{raw.subject}")
                self.handlers.add(task)
                task.add_done_callback(self._reap_handler)
        if self.handlers:
            log.info("stopping: waiting up to %.0fs for %d call(s) in flight", DRAIN_S, len(self.handlers))
            _, left = await asyncio.wait(set(self.handlers), timeout=DRAIN_S)
            for task in left:
                task.cancel()
            if left:
                await asyncio.wait(left, timeout=5.0)

    def _reap_handler(self, task: asyncio.Task[None]) -> None:
        self.handlers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("handling an escalation failed: %r", exc, exc_info=exc)

    # one request ---------------------------------------------------------------------------
    async def handle(self, raw: NatsMsg) -> None:
        msg, why = decode_checked(raw, self.names)
        if not isinstance(msg, EscalationRequest):
            reason = why or f"the gateway does not take {type_of(msg)} messages"  # type: ignore[arg-type]
            await self.bus.dead_letter(self.agent_id, raw, reason)
            await raw.term()
            return
        if msg.rid in self.busy:
            # the same request twice (a copy published again by a restarted brain): look again
            # once the first copy is answered
            await raw.nak(delay=self.settings.gateway_backoff_min_s)
            return
        self.busy.add(msg.rid)
        beat = asyncio.get_running_loop().create_task(self._heartbeat(raw))
        try:
            outcome = await self.answer(msg, raw.metadata.num_delivered)
            match outcome:
                case Wait():
                    await self._wait(msg, raw, outcome)
                case _:
                    await raw.ack()
        except asyncio.CancelledError:
            # stopping with the call unfinished: hand the request back for the next gateway
            with contextlib.suppress(*TRANSIENT):
                await raw.nak()
            raise
        except TRANSIENT as exc:
            # unacknowledged, it comes back after ack_wait; its answer, if any, is in the bucket
            if not self.bus.store.full:  # (the bus said that once)
                log.warning("%s: server error (%s); the request comes back", msg.rid, exc)
        finally:
            beat.cancel()
            self.busy.discard(msg.rid)

    async def _heartbeat(self, raw: NatsMsg) -> None:
        every = max(0.2, self.settings.gateway_ack_wait_s / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await raw.in_progress()
            except TRANSIENT as exc:
                log.warning("progress heartbeat failed: %s", exc)

    async def _wait(self, req: EscalationRequest, raw: NatsMsg, wait: Wait) -> None:
        now = time.time()
        tries = raw.metadata.num_delivered
        await self.bus.emit(
            EscalationWaiting(
                rid=req.rid,
                plan_id=req.plan_id,
                task_id=req.task_id,
                attempt=req.attempt,
                at=now,
                retry_at=now + wait.delay_s,
                reason=wait.reason[:500],
                tries=tries,
            )
        )
        log.info("%s: waiting %.1fs (try %d): %s", req.rid, wait.delay_s, tries, wait.reason[:200])
        await raw.nak(delay=wait.delay_s)

    async def answer(
        self, req: EscalationRequest, tries: int
    ) -> EscalationAnswered | EscalationFailed | Wait:
        """Decide one request: answered, failed for good, or to be tried again later."""
        done = await self._done(req)
        if done is not None:
            log.info("%s: answered before; publishing that answer again", req.rid)
            await self.bus.emit(done)
            return done
        s = self.settings
        if req.task.sensitive and not req.sensitive_allowed:
            return await self._fail(
                req,
                FailReason.SENSITIVE,
                "the task is sensitive and its plan does not allow escalating sensitive tasks "
                "(add '- sensitive: true' under '## Escalation' to allow it)",
            )
        if self.client is None:
            return await self._fail(
                req,
                FailReason.CONFIG,
                "the gateway has no Anthropic API key: set ANTHROPIC_API_KEY in its environment or "
                f"gateway_api_key in the config, restart it, then `mesh retry {req.plan_id}.{req.task_id}`",
            )
        if s.gateway_give_up_after_s and time.time() - req.at > s.gateway_give_up_after_s:
            return await self._fail(
                req,
                FailReason.UNREACHABLE,
                f"no answer from the API in {s.gateway_give_up_after_s:.0f}s (gateway_give_up_after_s), "
                f"after {tries - 1} tries",
            )
        prepared = prepare(req, self.redactor)
        worst = cost_usd(self.price, prepared.tokens_in_estimate, s.gateway_max_tokens)
        over = await self._over_budget(req, worst)
        if over:
            return await self._over(req, over, worst)
        tokens = prepared.tokens_in_estimate + s.gateway_max_tokens
        taken_at = await self._rate_turn(req.rid, tokens)
        if taken_at is None:
            return Wait(0.0, "the gateway stopped")
        keys = self._spend_keys(req, time.time())
        for key in keys:
            self.reserved[key] = self.reserved.get(key, 0.0) + worst
        try:
            return await self._call(req, prepared, tries, tokens, taken_at)
        finally:
            for key in keys:
                self.reserved[key] -= worst

    async def _call(
        self, req: EscalationRequest, prepared: Prepared, tries: int, tokens: int, taken_at: float
    ) -> EscalationAnswered | EscalationFailed | Wait:
        s = self.settings
        assert self.client is not None
        began = time.monotonic()
        messages: list[MessageParam] = [{"role": "user", "content": prepared.user}]
        choice: ToolChoiceAnyParam = {"type": "any"}
        try:
            resp = await self.client.messages.create(
                model=s.gateway_model,
                max_tokens=s.gateway_max_tokens,
                system=prepared.system,
                messages=messages,
                tools=cast("list[ToolParam]", prepared.tools),
                tool_choice=choice,
            )
        except anthropic.APIStatusError as exc:
            status = exc.status_code
            detail = f"{status} {_api_message(exc)}"
            if status in RETRY_STATUSES or status >= 500:
                after = esc_retry_after_s(dict(exc.response.headers), time.time())
                delay = after if after is not None else self._backoff(req, tries)
                return Wait(min(delay, s.gateway_backoff_max_s), f"the API answered {detail}")
            hint = " (check the API key)" if status in (401, 403) else ""
            return await self._fail(req, FailReason.REFUSED, f"the API refused the request: {detail}{hint}")
        except anthropic.APIConnectionError as exc:
            what = "timed out" if isinstance(exc, anthropic.APITimeoutError) else "is unreachable"
            return Wait(self._backoff(req, tries), f"the API {what}: {exc}")
        took = time.monotonic() - began
        tokens_in, tokens_out = usage_tokens(resp.usage)
        cost = cost_usd(self.price, tokens_in, tokens_out)
        await self._rate_settle(taken_at, tokens, tokens_in + tokens_out)
        await self._add_spend(req, cost, tokens_in, tokens_out)
        try:
            answer = read_answer(resp.content, req.followups_allowed)
        except AnswerError as exc:
            return await self._fail(
                req, FailReason.ERROR, f"Claude's answer cannot be used: {exc}", tokens_in, tokens_out, cost
            )
        keep = not req.task.sensitive
        event = EscalationAnswered(
            rid=req.rid,
            plan_id=req.plan_id,
            task_id=req.task_id,
            attempt=req.attempt,
            at=time.time(),
            model=resp.model or s.gateway_model,
            result=answer.result,
            followups=answer.followups,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost,
            duration_s=took,
            redacted=prepared.redacted,
            request_id=resp.id,
            prompt=prepared.user if keep else "",
            system=prepared.system if keep else "",
            stop_reason=resp.stop_reason or "",
        )
        await self._finish(event)
        log.info(
            "%s: answered with %s in %.2fs: %d tokens in, %d out, $%.4f%s",
            req.rid,
            "follow-up tasks" if answer.followups else "a result",
            took,
            tokens_in,
            tokens_out,
            cost,
            f", redacted {prepared.redacted}" if prepared.redacted else "",
        )
        return event

    # outcomes ----------------------------------------------------------------------------
    async def _fail(
        self,
        req: EscalationRequest,
        reason: FailReason,
        error: str,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost: float = 0.0,
    ) -> EscalationFailed:
        event = EscalationFailed(
            rid=req.rid,
            plan_id=req.plan_id,
            task_id=req.task_id,
            attempt=req.attempt,
            at=time.time(),
            reason=reason,
            error=error,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost,
        )
        await self._finish(event)
        log.warning("%s: failed (%s): %s", req.rid, reason, error)
        return event

    async def _finish(self, event: EscalationAnswered | EscalationFailed) -> None:
        """Keep the final event (so the request is never asked again), then publish it."""
        kv = await self.bus.gateway_kv()
        await kv.put(self.names.gateway_done_key(event.plan_id, event.task_id, event.attempt), encode(event))
        await self.bus.emit(event)

    async def _done(self, req: EscalationRequest) -> EscalationAnswered | EscalationFailed | None:
        kv = await self.bus.gateway_kv()
        try:
            entry = await kv.get(self.names.gateway_done_key(req.plan_id, req.task_id, req.attempt))
        except nats.js.errors.KeyNotFoundError:
            return None
        try:
            done = decode(entry.value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        match done:
            case EscalationAnswered() | EscalationFailed() if done.rid == req.rid:
                return done
        return None

    async def _over(
        self, req: EscalationRequest, over: tuple[str, float, float], worst: float
    ) -> EscalationFailed:
        scope, spent, limit = over
        now = time.time()
        message = (
            f"escalation budget {scope} reached: ${spent:.4f} spent of ${limit:.2f}; raise "
            f"{'gateway_budget_day_usd' if scope.startswith('day') else 'gateway_budget_plan_usd'} "
            f"or wait for the next day, then `mesh retry {req.plan_id}.{req.task_id}`"
        )
        # kept until it is resolved (see check_budget_alerts), then the alert is published
        kv = await self.bus.gateway_kv()
        alert = BudgetAlert(
            target=scope, limit_usd=limit, need_usd=worst, spent_usd=spent, raised_at=now, message=message
        )
        await kv.put(self._alert_key(scope), msgspec.json.encode(alert))
        await self.bus.emit(
            AlertRaised(
                rule=BUDGET_RULE,
                target=scope,
                host=self.host,
                severity="warning",
                at=now,
                metric="usd",
                value=spent,
                threshold=limit,
                message=f"{req.plan_id}.{req.task_id} not escalated: {message}",
            )
        )
        return await self._fail(req, FailReason.BUDGET, message)

    async def check_budget_alerts(self) -> None:
        """Resolve each budget alert whose condition is over: its day ended, its plan ended, or
        the call it refused fits the budget now (raised in the config, which a restart reads)."""
        kv = await self.bus.gateway_kv()
        s = self.settings
        now = time.time()
        for key, value in (await read_bucket(kv, "alert.>")).items():
            try:
                alert = _alert_decoder.decode(value)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.error("budget alert record %s is unreadable; dropping it", key)
                await kv.delete(key)
                continue
            scope, _, name = alert.target.partition(":")
            if scope == "day":
                limit, spend_key = s.gateway_budget_day_usd, self.names.gateway_spend_key("day", name)
            else:
                limit, spend_key = s.gateway_budget_plan_usd, self.names.gateway_spend_key("plan", name)
            spent = (await self._spend(kv, spend_key))[0].usd + self.reserved.get(spend_key, 0.0)
            ended = scope == "plan" and await self._plan_ended(name)
            why = budget_cleared(alert, utc_day(now), ended, spent, limit)
            if not why:
                if key not in self.alerts_seen:
                    self.alerts_seen.add(key)
                    log.info("budget alert %s holds: $%.4f spent of $%.2f", alert.target, spent, limit)
                continue
            # published first: a gateway dying before the delete resolves it again next time
            await self.bus.emit(
                AlertResolved(
                    rule=BUDGET_RULE,
                    target=alert.target,
                    host=self.host,
                    severity="warning",
                    at=now,
                    raised_at=alert.raised_at,
                    metric="usd",
                    value=spent,
                    threshold=limit,
                    message=f"escalation budget {alert.target}: {why}",
                )
            )
            await kv.delete(key)
            log.info("budget alert %s resolved: %s", alert.target, why)

    async def _plan_ended(self, plan_id: str) -> bool:
        """Whether a plan is final, or gone from the plans bucket (archived). A mesh without
        that bucket yet knows no plan: not ended."""
        try:
            kv = await self.bus.plans_kv()
        except MeshError:
            return False
        try:
            entry = await kv.get(plan_id)
        except nats.js.errors.KeyNotFoundError:
            return True
        try:
            return decode_plan(entry.value or b"").status in PLAN_FINAL_STATES
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if plan_id not in self._damaged_seen:
                self._damaged_seen.add(plan_id)
                log.warning("the record of plan %s is unreadable (%s); taking it as not ended", plan_id, exc)
            return False

    def _alert_key(self, target: str) -> str:
        scope, _, name = target.partition(":")
        return self.names.gateway_alert_key(scope, name)

    # rate limit: its log is in the bucket, shared by restarts ---------------------------
    async def _rate_turn(self, rid: str, tokens: int) -> float | None:
        """Wait until a call of `tokens` fits the rate limits, then count it. Returns when it
        was counted, or None when the gateway was asked to stop meanwhile."""
        s = self.settings
        if not (s.gateway_requests_per_min or s.gateway_tokens_per_min):
            return time.time()
        kv = await self.bus.gateway_kv()
        while True:
            limiter, revision = await self._rate_log(kv)
            now = time.time()
            delay = limiter.wait_s(tokens, now)
            if delay > 0:
                log.info("%s: rate limit: waiting %.1fs", rid, delay)
                if await self._sleep(delay):
                    return None
                continue
            limiter.take(tokens, now)
            if await self._rate_store(kv, limiter, revision, now):
                return now

    async def _rate_settle(self, taken_at: float, estimated: int, actual: int) -> None:
        """Count what a call really used instead of its estimate."""
        s = self.settings
        if not (s.gateway_requests_per_min or s.gateway_tokens_per_min):
            return
        kv = await self.bus.gateway_kv()
        while True:
            limiter, revision = await self._rate_log(kv)
            limiter.settle(taken_at, estimated, actual)
            if await self._rate_store(kv, limiter, revision, time.time()):
                return

    async def _rate_log(self, kv: Any) -> tuple[RateLimiter, int | None]:
        """The calls of the last minute (by this gateway and those before it), and the revision
        read (None: no log yet)."""
        s = self.settings
        limiter = RateLimiter(s.gateway_requests_per_min, s.gateway_tokens_per_min)
        try:
            entry = await kv.get(self.names.gateway_rate_key)
        except nats.js.errors.KeyNotFoundError:
            return limiter, None
        try:
            limiter.load(entry.value or b"")
        except ValueError as exc:
            log.error("the rate log is unreadable (%s); counting from an empty minute", exc)
        return limiter, entry.revision

    async def _rate_store(self, kv: Any, limiter: RateLimiter, revision: int | None, now: float) -> bool:
        """Write the log by compare-and-swap; False when another write came first."""
        try:
            if revision is None:
                await kv.create(self.names.gateway_rate_key, limiter.dump(now))
            else:
                await kv.update(self.names.gateway_rate_key, limiter.dump(now), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    # spend -------------------------------------------------------------------------------
    def _spend_keys(self, req: EscalationRequest, now: float) -> list[str]:
        n = self.names
        return [n.gateway_spend_key("day", utc_day(now)), n.gateway_spend_key("plan", req.plan_id)]

    async def _over_budget(self, req: EscalationRequest, worst: float) -> tuple[str, float, float] | None:
        """(scope, spent, limit) of the first budget this call could overrun, or None."""
        s = self.settings
        day_key, plan_key = self._spend_keys(req, time.time())
        kv = await self.bus.gateway_kv()
        for key, limit, scope in (
            (day_key, s.gateway_budget_day_usd, f"day:{day_key.rsplit('.', 1)[-1]}"),
            (plan_key, s.gateway_budget_plan_usd, f"plan:{req.plan_id}"),
        ):
            if not limit:
                continue
            spent = (await self._spend(kv, key))[0].usd + self.reserved.get(key, 0.0)
            if spent + worst > limit:
                return scope, spent, limit
        return None

    @staticmethod
    async def _spend(kv: Any, key: str) -> tuple[Spend, int | None]:
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return Spend(), None
        try:
            return _spend_decoder.decode(entry.value or b""), entry.revision
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.error("spend record %s is unreadable; counting from zero", key)
            return Spend(), entry.revision

    async def _add_spend(self, req: EscalationRequest, usd: float, tokens_in: int, tokens_out: int) -> None:
        await self._add_spend_to(self._spend_keys(req, time.time()), usd, tokens_in, tokens_out)

    async def _add_spend_to(self, keys: list[str], usd: float, tokens_in: int, tokens_out: int) -> None:
        kv = await self.bus.gateway_kv()
        for key in keys:
            while True:  # compare-and-swap: another gateway may write the same key
                spend, revision = await self._spend(kv, key)
                new = Spend(
                    usd=spend.usd + usd,
                    tokens_in=spend.tokens_in + tokens_in,
                    tokens_out=spend.tokens_out + tokens_out,
                    calls=spend.calls + 1,
                )
                try:
                    if revision is None:
                        await kv.create(key, msgspec.json.encode(new))
                    else:
                        await kv.update(key, msgspec.json.encode(new), last=revision)
                    break
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue

    # helpers -----------------------------------------------------------------------------
    def _backoff(self, req: EscalationRequest, tries: int) -> float:
        s = self.settings
        return esc_backoff_s(tries, s.gateway_backoff_min_s, s.gateway_backoff_max_s, req.rid)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, or return True at once when the gateway is asked to stop."""
        try:
            await asyncio.wait_for(self.stop_requested.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True


def _api_message(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:300]
    return str(exc.message)[:300]


def _usd_limit(value: float) -> str:
    return f"${value:.2f}" if value else "no limit"
