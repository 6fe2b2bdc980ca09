"""The JetStream resources mesh needs: streams, KV buckets and durable consumers.

Plain dicts in the JetStream API's own JSON form (the form `nats stream add --config FILE`
reads), built from `Settings` here and nowhere else; the agents apply them and `mesh init
--render nats/` writes the same dicts into `nats/`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from nats.js import api

from mesh.settings import Settings

log = logging.getLogger(__name__)


NS = 1_000_000_000


DAY_S = 86_400.0


def stream_definitions(settings: Settings) -> list[dict[str, Any]]:
    """The streams, in JetStream API form (durations in nanoseconds)."""
    n = settings.names
    dup_ns = int(settings.duplicate_window_s * NS)
    return [
        {
            "name": n.events_stream,
            "description": "mesh: the append-only history of everything that happened",
            "subjects": [n.evt_all],
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "max_age": int(settings.events_max_age_days * DAY_S * NS),
            "max_bytes": settings.events_max_bytes or -1,
            "max_msg_size": settings.max_payload_bytes,
            "duplicate_window": dup_ns,
            # a brain step's many events, records and work items are stored as atomic batches:
            # one disk sync each instead of one per message (docs/performance.md)
            "allow_atomic": True,
            "num_replicas": settings.replicas,
        },
        {
            "name": n.work_stream,
            "description": "mesh: tasks released by the brain, waiting for a worker",
            "subjects": [n.work_all],
            # not a work queue: an acknowledged item stays until the brain purges what every
            # consumer has acknowledged, about once a second, in bulk (`mesh.bus.workstream`)
            "retention": "limits",
            "storage": "file",
            "discard": "new",
            "max_age": 0,
            # the brain keeps this queue short (release_window per class; acknowledged items
            # purged within seconds); this is a backstop
            "max_bytes": settings.work_max_bytes,
            "max_msg_size": settings.max_payload_bytes,
            "duplicate_window": dup_ns,
            # a brain step's many events, records and work items are stored as atomic batches:
            # one disk sync each instead of one per message (docs/performance.md)
            "allow_atomic": True,
            "num_replicas": settings.replicas,
        },
        {
            "name": n.cmd_stream,
            "description": "mesh: plan submissions and operator commands for the brain",
            "subjects": [n.cmd_all],
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "max_age": int(settings.cmd_max_age_days * DAY_S * NS),
            "max_bytes": -1,
            "max_msg_size": settings.max_payload_bytes,
            "duplicate_window": dup_ns,
            "num_replicas": settings.replicas,
        },
        {
            "name": n.esc_stream,
            "description": "mesh: escalation requests from the brain, for the gateway",
            "subjects": [n.esc_all],
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "max_age": int(settings.cmd_max_age_days * DAY_S * NS),
            "max_bytes": -1,
            "max_msg_size": settings.max_payload_bytes,
            "duplicate_window": dup_ns,
            "num_replicas": settings.replicas,
        },
        history_stream_definition(settings),
    ]


def history_stream_definition(settings: Settings) -> dict[str, Any]:
    """Downsampled telemetry (`mesh.telhistory`): each point carries its tier's retention as a
    per-message TTL, so one stream keeps 10 s points for a day and 1 min points for a week; the
    stream's own age and size limits are the backstop."""
    n = settings.names
    keep_h = max(settings.history_fine_keep_h, settings.history_coarse_keep_h, 1.0)
    return {
        "name": n.history_stream,
        "description": "mesh: telemetry averaged per GPU and host, kept for a bounded age",
        "subjects": [n.history_all],
        "retention": "limits",
        "storage": "file",
        "discard": "old",
        "max_age": int(keep_h * 3600 * NS),
        "max_bytes": settings.history_max_bytes or -1,
        "max_msg_size": 64 * 1024,
        "duplicate_window": int(settings.duplicate_window_s * NS),
        "allow_msg_ttl": True,
        "num_replicas": settings.replicas,
    }


def bucket_definitions(settings: Settings) -> list[dict[str, Any]]:
    """The KV buckets; on a cluster (`replicas` > 1) each kept on that many servers."""
    buckets = _bucket_definitions(settings)
    if settings.replicas == 1:
        return buckets
    return [{**d, "replicas": settings.replicas} for d in buckets]


def _bucket_definitions(settings: Settings) -> list[dict[str, Any]]:
    """The KV buckets: current state (the event stream is the history)."""
    n = settings.names
    return [
        {
            "bucket": n.tasks_bucket,
            "description": "mesh: task id -> task record (written by the brain alone)",
            "history": settings.kv_history,
            "allow_atomic": True,
            "ttl": 0,
            "storage": "file",
            # workers read a task's record before running it: direct gets are the cheap path
            "allow_direct": True,
        },
        {
            "bucket": n.plans_bucket,
            "description": "mesh: plan id -> plan record (written by the brain alone)",
            "history": settings.kv_history,
            "allow_atomic": True,
            "ttl": 0,
            "storage": "file",
        },
        {
            "bucket": n.brain_bucket,
            "description": (
                "mesh: the brain's checkpoint (last event folded into KV), leadership lease and "
                "snapshot of its records"
            ),
            "history": 1,
            "ttl": 0,
            "storage": "file",
        },
        {
            "bucket": n.gpus_bucket,
            "description": "mesh: GPU id -> its latest gpu.state (written by that GPU's worker alone)",
            "history": 1,
            "ttl": 0,
            "storage": "file",
        },
        {
            "bucket": n.telemetry_bucket,
            "description": "mesh: <host>.gpu<N> / <host>.host -> latest telemetry (by that host's watchdog)",
            "history": 1,
            # a host whose watchdog stopped leaves no stale readings behind for long
            "ttl": int(settings.telemetry_ttl_s * NS),
            # rewritten every few seconds and worthless after a restart: memory, not disk
            "storage": "memory",
        },
        {
            "bucket": n.gpu_control_bucket,
            "description": "mesh: <gpu>.thermal / <gpu>.operator -> whether that GPU's worker may claim work",
            "history": 1,
            "ttl": 0,
            "storage": "file",
        },
        {
            "bucket": n.agents_bucket,
            "description": "mesh: agent id -> registration; a key vanishes when its agent stops refreshing",
            "history": 1,
            "ttl": int(settings.agent_ttl_s * NS),
            "storage": "file",
        },
        {
            "bucket": n.gateway_bucket,
            "description": "mesh: the gateway's spend per day and plan, and each escalation's final answer",
            "history": 1,
            "ttl": 0,
            "storage": "file",
        },
    ]


def consumer_definitions(settings: Settings, classes: tuple[str, ...] = ("cpu",)) -> list[dict[str, Any]]:
    """Durable pull consumers: `stream` names where each lives."""
    n = settings.names
    ack_wait = int(settings.ack_wait_s * NS)
    out: list[dict[str, Any]] = [
        {
            "stream": n.cmd_stream,
            "config": {
                "durable_name": n.brain_cmd_consumer,
                "filter_subject": n.cmd_all,
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "ack_wait": int(settings.brain_ack_wait_s * NS),
                "max_ack_pending": 1000,
            },
        },
        {
            "stream": n.events_stream,
            "config": {
                "durable_name": n.brain_runs_consumer,
                "filter_subjects": [n.runs_all, n.gpu_states_all],
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "ack_wait": int(settings.brain_ack_wait_s * NS),
                "max_ack_pending": 10000,
            },
        },
    ]
    out.append(
        {
            "stream": n.events_stream,
            "config": {
                "durable_name": n.brain_esc_consumer,
                "filter_subject": n.esc_events_all,
                "ack_policy": "explicit",
                "deliver_policy": "all",
                "ack_wait": int(settings.brain_ack_wait_s * NS),
                "max_ack_pending": 10000,
            },
        }
    )
    out.append(gateway_consumer_definition(settings))
    out.append(
        {
            "stream": n.events_stream,
            "config": {
                "durable_name": n.auditor_consumer,
                "filter_subjects": n.audited_subjects(),
                "ack_policy": "all",
                # an existing history is not audited again from its start
                "deliver_policy": "new",
                "ack_wait": 30 * NS,
                "max_ack_pending": 20000,
            },
        }
    )
    for cls in classes:
        if cls == "llm":
            continue  # LLM work is queued per model: see `llm_consumer_definition`
        out.append(
            {
                "stream": n.work_stream,
                "config": {
                    "durable_name": n.workers_consumer(cls),
                    "filter_subject": n.work(cls),
                    "ack_policy": "explicit",
                    "deliver_policy": "all",
                    "ack_wait": ack_wait,
                    "max_ack_pending": -1,
                },
            }
        )
    return out


def gateway_consumer_definition(settings: Settings) -> dict[str, Any]:
    """The gateway's consumer of escalation requests. A request is acknowledged only once it is
    answered or has failed for good; one waiting out a backoff is handed back with a delay
    (`nak`), so the server, not the gateway, holds pending retries across restarts."""
    n = settings.names
    return {
        "stream": n.esc_stream,
        "config": {
            "durable_name": n.gateway_consumer,
            "filter_subject": n.esc_all,
            "ack_policy": "explicit",
            "deliver_policy": "all",
            "ack_wait": int(settings.gateway_ack_wait_s * NS),
            "max_deliver": -1,
            "max_ack_pending": 1000,
        },
    }


def llm_consumer_definition(settings: Settings, model: str) -> dict[str, Any]:
    """The consumer the workers holding `model` share (created by the first one to load it)."""
    n = settings.names
    return {
        "durable_name": n.llm_consumer(model),
        "filter_subject": n.work_llm(model),
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": int(settings.ack_wait_s * NS),
        "max_ack_pending": -1,
    }


def own_consumer_definition(settings: Settings, worker: str) -> dict[str, Any]:
    """One worker's queue of resource tasks; forgotten by the server a day after its worker went."""
    n = settings.names
    return {
        "durable_name": n.own_consumer(worker),
        "filter_subject": n.work_to(worker),
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "ack_wait": int(settings.ack_wait_s * NS),
        "max_ack_pending": -1,
        "inactive_threshold": int(DAY_S * NS),
    }


def _stream_config(d: dict[str, Any]) -> api.StreamConfig:
    config: api.StreamConfig = api.StreamConfig.from_response(copy.deepcopy(d))
    return config


def _consumer_config(d: dict[str, Any]) -> api.ConsumerConfig:
    config: api.ConsumerConfig = api.ConsumerConfig.from_response(copy.deepcopy(d))
    return config


def _kv_config(d: dict[str, Any]) -> api.KeyValueConfig:
    return api.KeyValueConfig(
        bucket=d["bucket"],
        description=d.get("description"),
        history=d["history"],
        ttl=(d["ttl"] / NS) or None,
        storage=api.StorageType(d["storage"]),
        direct=d.get("allow_direct", False),
        replicas=d.get("replicas", 1),
    )
