"""mesh's NATS client: nats-py's, with a header parser that costs a fourth as much, and sinks:
subscriptions whose messages go straight to a plain function, for reading history back.

Every event mesh stores carries headers (its type, its `Nats-Msg-Id`, an atomic batch's marks),
and nats-py parses each message's headers before anyone sees it: its parser tests a header
name for whitespace with a generator over its characters, which was the largest single cost
of reading history back (replay, a brain catching up) after the message itself. This parser
gives the same dict for every block (tests/test_natsclient.py holds it to nats-py's own, over
status lines, odd spacing, bad bytes and empty names); everything else is nats-py's.

nats-py hands each message of a subscription with a callback to a queue, and a task of the
subscription's takes it from there and awaits the callback: a queue put, a task switch and a
coroutine per message (9.1 µs a message in the client that way, 7.7 through a sink; a raw read
of history 14.1 µs against 11.3, docs/performance.md). A read of history
(`mesh.bus.read.read_stream`) wants none of it: its messages only need to land in a deque. A
sink subscription's messages are built and handed to a plain callable as they are parsed off
the socket, by a protocol parser that takes them off each chunk in a loop of its own
(`SinkParser`: 4.5 µs a frame through the client with nats-py's parser, 3.0 with it) and leaves
everything else to nats-py's.

A request in flight when the connection is lost may never be answered: its message, or its
reply, went down with the old connection. nats-py lets it wait out its whole timeout (a JetStream
publish: 10 s here), and everything queued behind it waits too: a worker's reports, so the
server redelivered the items they were for and another worker ran them again. The requests and
acknowledgement batches in flight at a disconnect that are still unanswered `LOST_REPLY_S` after
the reconnect fail with `LostReply` (a transient error: their senders publish again, and the
server drops a message it already has by its `Nats-Msg-Id`).

A brain's commit publishes hundreds of messages at once, and nats-py's `publish` is three
coroutines a message, with a regular expression per header name and a header block built a
byte at a time. `publish_many` builds the protocol lines of a whole batch (byte for byte what
nats-py would write: tests/test_natsclient.py) and hands them to the client's buffer together;
`ack_many` acknowledges a batch of JetStream messages the same way.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg as NatsMsg
from nats.aio.subscription import Subscription
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

log = logging.getLogger(__name__)

# how long after a reconnect a request sent before the connection was lost may still be
# answered: one whose message waited in the client's buffer went out at the reconnect and is
# answered in milliseconds; one written to the lost connection never is
LOST_REPLY_S = 1.0


class LostReply(nats.errors.Error):
    """No reply can come: the connection was lost while the request was in flight."""

    def __str__(self) -> str:
        return "nats: the connection was lost while this request waited for its reply"


_CRLF = b"\r\n"
# what a subject may not hold (nats-py's publish checks the same): a space, tab, CR or LF would
# end the protocol line early
_UNSAFE = re.compile(r"[ \t\r\n]")
# a header name (RFC 7230's token, as nats-py checks it)
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# header names seen to be tokens (a handful, the same in every message)
_GOOD_NAMES: set[str] = set()

# (subject, payload, reply ('' : none), headers (None: none)) of one message to publish
Outgoing = tuple[str, bytes, str, "Mapping[str, str] | None"]


def header_block(headers: Mapping[str, str]) -> bytes:
    """The NATS header block of `headers` (`NATS/1.0`, a `name: value` line each, a blank line),
    byte for byte as nats-py's publish builds it: names and values stripped, an empty name
    skipped, a name that is not a token refused (`BadHeaderError`), a CR or LF in a value a
    space (it would start a header of its own; tests/test_natsclient.py holds the two to each
    other)."""
    parts = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        key = name
        if name not in _GOOD_NAMES:
            key = name.strip()
            if not key:
                continue
            if not _HEADER_NAME.fullmatch(key):
                raise nats.errors.BadHeaderError(key)
            if key == name and len(_GOOD_NAMES) < 1024:
                _GOOD_NAMES.add(name)
        value = value.strip()
        if "\r" in value or "\n" in value:
            value = value.replace("\r", " ").replace("\n", " ")
        parts.append(f"{key}: {value}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode()


# what bytes.strip() strips: ASCII whitespace, without the separators str.strip() also takes
_WS = " \t\n\r\x0b\x0c"


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """`Name: Value` lines as nats-py reads them: split at the first colon, both sides
    stripped, a name that is not ASCII or holds whitespace skipped, a value decoded as UTF-8
    with bad bytes replaced. An all-ASCII block (every header mesh writes) is decoded once."""
    if not raw.isascii():
        return _parse_bytes(raw)
    out: dict[str, str] = {}
    for line in raw.decode("ascii").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip(_WS)
        # a name splits into itself alone unless it holds whitespace (str.split and str.isspace
        # agree on what whitespace is; the strip left some of it at the ends)
        if key and key.split() != [key]:
            continue
        out[key] = value.strip(_WS)
    return out


def _parse_bytes(raw: bytes) -> dict[str, str]:
    """`parse_header_lines` for a block with bytes beyond ASCII, a line at a time."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if key and key.split() != [key]:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


# a header block opens with this line (then `\r\n`, or a space and a status)
_HDR_LINE = b"NATS/1.0"
_HDR_END = len(_HDR_LINE)
_STATUS_LEN = 3


def parse_headers(
    block: bytes, lines: Callable[[bytes], dict[str, str]] = parse_header_lines
) -> dict[str, str] | None:
    """A message's whole header block as nats-py's client reads it, synchronously: None for
    none, else its headers by `lines`, and where the block opens with a status line
    (`NATS/1.0 409 Batch Completed`) its code as `Status` (when it is a number) and the rest of
    that line as `Description`, before any headers that follow (a heartbeat's)."""
    if not block:
        return None
    if block[_HDR_END : _HDR_END + 1] != b" ":
        # `NATS/1.0\r\n` and the headers, the form of every message mesh stores
        if len(block) <= _HDR_END + 2:
            return None
        return lines(block[_HDR_END + 2 :]) or None
    out: dict[str, str] = {}
    status_line = block[_HDR_END + 1 :]
    code = status_line[:_STATUS_LEN].strip().decode()
    if code.isdigit():
        out["Status"] = code
    # the description runs to the end of the line, or of the block less its closing blank line
    described = status_line[_STATUS_LEN + 1 : len(status_line) - 4]
    if described:
        end = described.find(_CRLF)
        if end > 0:
            out["Description"] = described[:end].decode()
            out.update(lines(described[end + 2 :]))
        else:
            out["Description"] = described.decode()
    after_status = block[_HDR_END:]
    if len(after_status) - (after_status.find(_CRLF) + 2) <= 2:
        return out  # nothing after the status line: `{}` for a status that is not a number
    # nats-py reads headers after a status line from just past `NATS/1.0\r`, the status line
    # included (a name with whitespace in it, so skipped): read as it does, for the same dict
    more = lines(block[_HDR_END + 2 :])
    if not out:
        return more or None
    out.update(more)
    return out


Sink = Callable[[NatsMsg], object]

_UNREAD: dict[str, str] = {}  # (a marker: headers not parsed yet)


class SinkMsg(NatsMsg):
    """A message handed to a sink. Its header block is parsed when `headers` is first read: a
    history read looks at the headers of none but the status messages that end its batches
    (`status_of` tells those from the block's first line), and a replay of a million-task
    history parsed two million header blocks nobody read."""

    _block: bytes = b""

    @property
    def headers(self) -> dict[str, str] | None:
        parsed: dict[str, str] | None = self.__dict__.get("_headers", _UNREAD)
        if parsed is _UNREAD:
            lines = getattr(self._client, "_parse_header_lines", parse_header_lines)
            parsed = parse_headers(self._block, lines)
            self.__dict__["_headers"] = parsed
        return parsed

    @headers.setter
    def headers(self, value: dict[str, str] | None) -> None:
        self.__dict__["_headers"] = value


def status_of(raw: NatsMsg) -> str | None:
    """A status message's code (`404`, `408`, `409`...), None for any other message; a sink's
    message is told from its block's first line, its headers left unparsed."""
    if isinstance(raw, SinkMsg) and "_headers" not in raw.__dict__:
        block = raw._block
        if block[_HDR_END : _HDR_END + 1] != b" ":
            return None  # `NATS/1.0\r\n` (or no block): headers, no status line
    headers = raw.headers
    return headers.get("Status") if headers else None


def _fail_unanswered(replies: list[asyncio.Future[Any]]) -> None:
    lost = [f for f in replies if not f.done()]
    if lost:
        log.info("%d request(s) sent before the connection was lost got no reply: sending again", len(lost))
    for reply in lost:
        reply.set_exception(LostReply())


class MeshClient(Client):
    """nats-py's client with `parse_header_lines` for its header blocks, and sink subscriptions."""

    _parse_header_lines = staticmethod(parse_header_lines)

    # whether whole-stream reads take their messages through a sink (`read_stream`); off, they
    # go through a subscription's callback as with nats-py's own client (tools/replay_rate.py
    # compares the two)
    read_sinks = True

    def __init__(self) -> None:
        super().__init__()
        self._sinks: dict[int, Sink] = {}
        self._ps = SinkParser(self)
        # replies awaited outside nats-py's requests (`awaiting`), and those in flight at the
        # last disconnect (`connection_lost`)
        self._awaited: set[asyncio.Future[Any]] = set()
        self._cut: list[asyncio.Future[Any]] = []

    def awaiting(self, reply: asyncio.Future[Any]) -> None:
        """Count `reply` among the replies a lost connection fails (`connection_lost`)."""
        self._awaited.add(reply)
        reply.add_done_callback(self._awaited.discard)

    def connection_lost(self) -> None:
        """The connection is gone: note the replies awaited now (nats-py's requests and those
        of `awaiting`), to fail the ones still unanswered soon after the reconnect."""
        waiting = [*self._resp_map.values(), *self._awaited]
        self._cut += [f for f in waiting if not f.done()]

    def connection_back(self) -> None:
        """Connected again: the replies awaited at the disconnect fail with `LostReply` unless
        they come within `LOST_REPLY_S`."""
        cut, self._cut = self._cut, []
        if cut:
            asyncio.get_running_loop().call_later(LOST_REPLY_S, _fail_unanswered, cut)

    async def publish_many(self, messages: Iterable[Outgoing]) -> int:
        """Publish `messages` (subject, payload, reply, headers), in order, as nats-py's
        `publish` would one by one, with the same checks, but their protocol lines are built
        here and put into the client's buffer together, with one wake of its writer: a brain's
        commit or a worker's reports publish hundreds at once, and nats-py's `publish` (three
        coroutines, a regular expression per header name, a header block built byte by byte)
        was the largest part of the brain's own time (docs/performance.md). Returns how many
        were published."""
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        lines: list[bytes] = []
        size = 0
        payloads = 0
        limit = self._max_payload
        for subject, payload, reply, headers in messages:
            if not subject or _UNSAFE.search(subject) or (reply and _UNSAFE.search(reply)):
                raise nats.errors.BadSubjectError
            n = len(payload)
            if n > limit:
                raise nats.errors.MaxPayloadError
            if headers is not None:
                block = header_block(headers)
                line = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                    subject.encode(),
                    reply.encode(),
                    len(block),
                    len(block) + n,
                    block,
                    payload,
                )
            else:
                line = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), n, payload)
            lines.append(line)
            size += len(line)
            payloads += n
        if not lines:
            return 0
        if not self.is_connected and (
            self._max_pending_size <= 0 or size + self._pending_data_size > self._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        self._pending.extend(lines)
        self._pending_data_size += size
        self.stats["out_msgs"] += len(lines)
        self.stats["out_bytes"] += payloads
        if self._max_pending_size > 0 and self._pending_data_size > self._max_pending_size:
            await self._flush_pending(force_flush=True)
        elif self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()
        return len(lines)

    async def ack_many(self, msgs: list[NatsMsg]) -> None:
        """Acknowledge JetStream messages, in order, as `Msg.ack` does each (an empty message
        to its reply subject), in one `publish_many`."""
        for msg in msgs:
            msg._check_reply()
        await self.publish_many((msg.reply, b"", "", None) for msg in msgs)
        for msg in msgs:
            msg._ackd = True

    async def subscribe_sink(self, subject: str, sink: Sink) -> Subscription:
        """A subscription to `subject` whose every message is handed to `sink` as soon as it is
        parsed, on the connection's reading task: `sink` must be quick and must not block (it
        may not await). An exception it raises goes to the connection's error callback. The
        sink is dropped when the subscription is unsubscribed; through a reconnect it stays,
        as nats-py keeps the subscription's id."""
        sub = await self.subscribe(subject, pending_bytes_limit=0)
        self._sinks[sub._id] = sink
        # (nothing can have come before the sink was set unless the subject was already
        # published to while the subscription was sent: that went to its queue, and goes on)
        while not sub._pending_queue.empty():
            sink(sub._pending_queue.get_nowait())
        return sub

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._sinks.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        sink = self._sinks.get(sid)
        if sink is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        failed = self._to_sink(sink, sid, subject, reply, data, headers)
        if failed is not None:
            await self._error_cb(failed)

    def _to_sink(
        self, sink: Sink, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> Exception | None:
        """Build a sink subscription's message and hand it over; what the sink raised, which
        goes to the error callback as nats-py gives it a callback's error."""
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        sub = self._subs.get(sid)
        if sub is None:  # the connection was closed under it
            del self._sinks[sid]
            return None
        sub._received += 1
        if sub._max_msgs > 0 and sub._received >= sub._max_msgs:
            self._remove_sub(sid)
        msg = SinkMsg.__new__(SinkMsg)
        # what the dataclass's __init__ would set, less the headers (parsed when read)
        msg.__dict__.update(
            _client=self,
            subject=subject.decode(),
            reply=reply.decode(),
            data=data,
            _metadata=None,
            _ackd=False,
            _sid=sid,
            _block=headers or b"",
        )
        try:
            sink(msg)
        except Exception as exc:
            return exc
        return None


# a message's protocol line opens with one of these (the server writes one space after the op)
_HMSG = b"HMSG "
_MSG = b"MSG "


class SinkParser(Parser):
    """nats-py's protocol parser, with the messages of sink subscriptions taken off each chunk
    the socket gives in a loop of their own: found by offset in the chunk, their protocol line
    split rather than matched by a regular expression, handed to the sink without a coroutine
    each. nats-py's parser cuts each message off the front of its buffer, tries its regular
    expressions in turn and awaits the client's handler per message: 2.3 µs a frame of a
    history read, where this loop takes about 1 (tools/replay_rate.py --compare frames).

    Anything else (a message for a subscription without a sink, a PING, an INFO, an error, a
    line that does not parse) goes to nats-py's parser with the rest of the chunk, so what it
    does with those is unchanged; a sink's message cut off at the chunk's end waits for the
    next chunk here."""

    # how many bytes the buffer must hold before a sink's message cut off at a chunk's end can
    # be taken (0: unknown): a message of many chunks is gathered, not parsed again with each
    _wanted = 0

    def reset(self) -> None:
        super().reset()
        self._wanted = 0

    async def parse(self, data: bytes = b"") -> None:
        nc = self.nc
        sinks = nc._sinks
        if not sinks or self.state != AWAITING_CONTROL_LINE:
            self._wanted = 0
            await super().parse(data)
            return
        if self.buf:
            self.buf.extend(data)
            if len(self.buf) < self._wanted:
                return
            data = bytes(self.buf)
            self.buf = bytearray()
        self._wanted = 0
        size = len(data)
        pos = 0
        waiting = False  # a sink's message, or a protocol line, cut off at the chunk's end
        while pos < size:
            eol = data.find(_CRLF, pos)
            if eol < 0:
                waiting = True
                break
            with_headers = data.startswith(_HMSG, pos)
            if not with_headers and not data.startswith(_MSG, pos):
                break
            parts = data[pos + (5 if with_headers else 4) : eol].split()
            count = len(parts)
            if not (4 <= count <= 5 if with_headers else 3 <= count <= 4):
                break
            try:
                sid = int(parts[1])
                total = int(parts[-1])
                header_size = int(parts[-2]) if with_headers else 0
            except ValueError:
                break
            sink = sinks.get(sid)
            if sink is None or not 0 <= header_size <= total:
                break
            start = eol + 2
            end = start + total
            if end + 2 > size:
                waiting = True
                self._wanted = end + 2 - pos
                break
            reply = parts[2] if count == (5 if with_headers else 4) else b""
            if header_size:
                headers: bytes | None = data[start : start + header_size]
                payload = data[start + header_size : end]
            else:
                headers, payload = None, data[start:end]
            pos = end + 2
            failed = nc._to_sink(sink, sid, parts[0], reply, payload, headers)
            if failed is not None:
                await nc._error_cb(failed)
        if pos < size:
            self.buf = bytearray(data[pos:] if pos else data)
            if not waiting:
                await super().parse()
