"""The gateway's operator questions: one turn of `mesh ask`'s conversation, answered with Claude.
Served on `<p>.ask.*` (core NATS request, a queue group of the gateways) beside the escalations.

For each turn (`ask.turn` from `mesh.operator`):

1. the sender check: the message says it is an `ask.turn`, decodes as one, names as its asker
   the subject's last token (the server lets each role publish only under its own name), and
   holds a conversation of operator tool calls only (`conversation_problem`); anything else is
   refused (`ask.refused`, reason `bad_request`) and logged;
2. no API key: refused (`config`);
3. the conversation is redacted (the gateway's `[redact]` rules, as for escalations) and priced
   at its worst: over the day's budget, or the question's own (`gateway_budget_ask_usd`, all
   turns of one question together), refused (`budget`);
4. it waits its turn in the rate limit the escalations share, then streams the call: each text
   delta goes to the asker as an `ask.chunk`, the whole turn as one `ask.reply` (its tool calls
   for the asker to run), with its cost, which is added to the day's spend and the question's.

The instructions and the tools are `mesh.operator`'s: the gateway answers operator questions
with them only, never with instructions or tools an asker sends. Nothing is retried: an asker
is waiting, and an unreachable API is said at once (`unreachable`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import anthropic
import msgspec
from anthropic.types import MessageParam, ToolParam
from nats.aio.msg import Msg as NatsMsg

from mesh.bus.jetstream import TRANSIENT
from mesh.escalation import cost_usd, usage_tokens, utc_day
from mesh.names import HEADER_TYPE, check_token
from mesh.operator import (
    SYSTEM,
    TOOLS,
    AskChunk,
    AskMessage,
    AskRefused,
    AskReply,
    AskTurn,
    conversation_problem,
    decode_ask,
    encode_ask,
    tokens_estimate,
)

log = logging.getLogger("mesh.gateway")

# chunks of text gathered this long before they are sent on (fewer, bigger messages)
CHUNK_S = 0.05


def _qid_of(data: bytes) -> str:
    """The question id of a turn refused as unreadable, where it can be read ('' otherwise)."""
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return ""
    qid = value.get("qid") if isinstance(value, dict) else None
    return qid if isinstance(qid, str) and len(qid) <= 64 else ""


class AskServer:
    def __init__(self, gateway: Any) -> None:
        # the `agents.gateway.Gateway` it serves beside (its client, redactor, price, budget and
        # rate limit); typed loosely, as that module imports this one
        self.gw = gateway
        self.busy = asyncio.Semaphore(max(1, gateway.settings.gateway_concurrency))

    async def start(self) -> None:
        names = self.gw.names
        await self.gw.bus.nc.subscribe(names.ask_all, queue=names.gateway_consumer, cb=self.on_turn)
        # the SUB waits in the client's buffer until the next flush: a round trip to the server
        # first, so that "answering" is said only once a question can reach this gateway
        await self.gw.bus.nc.flush()
        log.info("answering operator questions on %s", names.ask_all)

    async def on_turn(self, raw: NatsMsg) -> None:
        self.gw.spawn(self._safely(raw), "ask")

    async def _safely(self, raw: NatsMsg) -> None:
        try:
            async with self.busy:
                await self.handle(raw)
        except TRANSIENT as exc:
            log.warning("answering an operator question failed on the server: %r", exc)
        except Exception as exc:  # a question's failure must never stop the gateway
            log.error("answering an operator question failed: %r", exc, exc_info=exc)
            await self._send(
                raw, AskRefused(qid="", reason="error", error=f"the gateway failed: {exc!r}"[:500])
            )

    async def _send(self, raw: NatsMsg, msg: AskMessage) -> None:
        if raw.reply:
            kind = str(msg.__struct_config__.tag)
            await self.gw.bus.nc.publish(raw.reply, encode_ask(msg), headers={HEADER_TYPE: kind})

    def check(self, raw: NatsMsg) -> tuple[AskTurn | None, str]:
        """The sender check: (the turn, '') or (None, why it is refused)."""
        kind = (raw.headers or {}).get(HEADER_TYPE, "")
        if kind != "ask.turn":
            return None, f"a {kind or 'untyped'} message on an operator subject"
        try:
            msg = decode_ask(raw.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return None, f"not an ask.turn: {exc}"
        if not isinstance(msg, AskTurn):
            return None, "not an ask.turn"
        asker = raw.subject.rsplit(".", 1)[-1]
        if msg.asker != asker:
            return None, f"the turn names asker {msg.asker!r} on {asker!r}'s subject"
        try:
            check_token(msg.qid, "question id")
        except ValueError as exc:
            return None, str(exc)
        problem = conversation_problem(msg.messages)
        if problem:
            return None, problem
        return msg, ""

    async def handle(self, raw: NatsMsg) -> None:
        turn, why = self.check(raw)
        if turn is None:
            log.warning("refused an operator question on %s: %s", raw.subject, why)
            await self._send(raw, AskRefused(qid=_qid_of(raw.data), reason="bad_request", error=why[:500]))
            return
        if not raw.reply:
            log.warning("an operator question on %s without a reply subject; dropped", raw.subject)
            return
        reply = await self.answer(turn, raw.reply)
        await self._send(raw, reply)

    async def answer(self, turn: AskTurn, inbox: str) -> AskReply | AskRefused:
        gw, s = self.gw, self.gw.settings
        qid = turn.qid
        if gw.client is None:
            return AskRefused(
                qid=qid,
                reason="config",
                error="the gateway has no Anthropic API key: set ANTHROPIC_API_KEY in its environment or "
                "gateway_api_key in the config and restart it, or set operator_model to a local model",
            )
        messages, counts = gw.redactor.value(turn.messages)
        estimate = tokens_estimate(messages)
        worst = cost_usd(gw.price, estimate, s.gateway_max_tokens)
        keys = self._spend_keys(qid)
        over = await self._over_budget(keys, worst)
        if over:
            return AskRefused(qid=qid, reason="budget", error=over)
        tokens = estimate + s.gateway_max_tokens
        taken_at = await gw._rate_turn(f"ask:{qid}", tokens)
        if taken_at is None:
            return AskRefused(qid=qid, reason="unreachable", error="the gateway is stopping")
        for key in keys:
            gw.reserved[key] = gw.reserved.get(key, 0.0) + worst
        try:
            return await self._call(turn, messages, dict(counts), inbox, taken_at, tokens, keys)
        finally:
            for key in keys:
                gw.reserved[key] -= worst

    async def _call(
        self,
        turn: AskTurn,
        messages: list[dict[str, Any]],
        redacted: dict[str, int],
        inbox: str,
        taken_at: float,
        tokens: int,
        keys: list[str],
    ) -> AskReply | AskRefused:
        gw, s, qid = self.gw, self.gw.settings, turn.qid
        assert gw.client is not None
        nc = gw.bus.nc
        pending: list[str] = []
        sent_at = time.monotonic()
        try:
            async with gw.client.messages.stream(
                model=s.gateway_model,
                max_tokens=s.gateway_max_tokens,
                system=SYSTEM,
                messages=cast("list[MessageParam]", messages),
                tools=cast("list[ToolParam]", TOOLS),
            ) as stream:
                async for text in stream.text_stream:
                    pending.append(text)
                    if time.monotonic() - sent_at >= CHUNK_S:
                        await nc.publish(inbox, encode_ask(AskChunk(qid=qid, text="".join(pending))))
                        pending.clear()
                        sent_at = time.monotonic()
                final = await stream.get_final_message()
        except anthropic.APIStatusError as exc:
            hint = " (check the API key)" if exc.status_code in (401, 403) else ""
            reason = "unreachable" if exc.status_code in (408, 429) or exc.status_code >= 500 else "refused"
            return AskRefused(
                qid=qid, reason=reason, error=f"the API answered {exc.status_code}{hint}: {exc.message}"[:500]
            )
        except anthropic.APIConnectionError as exc:
            return AskRefused(qid=qid, reason="unreachable", error=f"the API is unreachable: {exc}"[:500])
        if pending:
            await nc.publish(inbox, encode_ask(AskChunk(qid=qid, text="".join(pending))))
        tokens_in, tokens_out = usage_tokens(final.usage)
        cost = cost_usd(gw.price, tokens_in, tokens_out)
        await gw._rate_settle(taken_at, tokens, tokens_in + tokens_out)
        await gw._add_spend_to(keys, cost, tokens_in, tokens_out)
        log.info(
            "operator question %s from %s: %d tokens in, %d out, $%.4f%s",
            qid,
            turn.asker,
            tokens_in,
            tokens_out,
            cost,
            f", redacted {redacted}" if redacted else "",
        )
        return AskReply(
            qid=qid,
            content=[block.model_dump(mode="json", exclude_none=True) for block in final.content],
            stop_reason=final.stop_reason or "",
            model=final.model or s.gateway_model,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost,
            redacted=redacted,
        )

    def _spend_keys(self, qid: str) -> list[str]:
        n = self.gw.names
        return [n.gateway_spend_key("day", utc_day(time.time())), n.gateway_spend_key("ask", qid)]

    async def _over_budget(self, keys: list[str], worst: float) -> str:
        """Why this turn could overrun the day's or the question's budget ('' when it cannot)."""
        gw, s = self.gw, self.gw.settings
        kv = await gw.bus.gateway_kv()
        for key, limit, what, setting in (
            (keys[0], s.gateway_budget_day_usd, "the day's escalation budget", "gateway_budget_day_usd"),
            (keys[1], s.gateway_budget_ask_usd, "this question's budget", "gateway_budget_ask_usd"),
        ):
            if not limit:
                continue
            spent = (await gw._spend(kv, key))[0].usd + gw.reserved.get(key, 0.0)
            if spent + worst > limit:
                return (
                    f"{what} would be exceeded: ${spent:.4f} spent of ${limit:.2f}, and this turn may cost "
                    f"${worst:.4f}; raise {setting}, or ask a narrower question"
                )
        return ""
