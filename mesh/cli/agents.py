"""The agents: `mesh agent ROLE` runs one in the foreground (what `mesh up` and systemd run),
`mesh agents` lists those registered now.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer

from mesh.bus import client
from mesh.bus.publish import Bus
from mesh.cli.common import command_group, connected, err, fail, out, run, settings
from mesh.events import TASK_CLASSES
from mesh.host.logs import configure

agent_app = command_group(help="Run one agent in the foreground (what `mesh up` and systemd run).")


@agent_app.command("brain")
def agent_brain(
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The brain: releases tasks, cascades results, retries."""
    from agents.base import run_agent
    from agents.brain import Brain

    configure(log_level, name="brain")
    s = settings()
    raise typer.Exit(run_agent(Brain(s)))


@agent_app.command("auditor")
def agent_auditor(
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The auditor: dead-letters malformed messages on event subjects nobody else consumes."""
    from agents.auditor import Auditor
    from agents.base import run_agent

    configure(log_level, name="auditor")
    raise typer.Exit(run_agent(Auditor(settings())))


@agent_app.command("watchdog")
def agent_watchdog(
    host: Annotated[
        str | None,
        typer.Option("--host", help="the host name telemetry is filed under (default: this host's)"),
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The watchdog (one per host): GPU and host telemetry, and alerts."""
    from agents.base import run_agent
    from agents.watchdog import Watchdog

    configure(log_level, name="watchdog")
    raise typer.Exit(run_agent(Watchdog(settings(), host=host, loader=settings)))


@agent_app.command("exporter")
def agent_exporter(
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="serve /metrics on this port (default 9464)"),
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The Prometheus exporter: GPU telemetry and states, queues, task durations, alerts on /metrics."""
    from agents.base import run_agent
    from agents.exporter import Exporter

    configure(log_level, name="exporter")
    raise typer.Exit(run_agent(Exporter(settings(metrics_port=port))))


@agent_app.command("web")
def agent_web(
    port: Annotated[
        int | None, typer.Option("--port", min=0, max=65535, help="serve on this port (default 8470; 0: any)")
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="serve on this address (default 127.0.0.1; off it, a token)")
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The web console: plans and their DAGs, GPUs and hosts, alerts, dead letters, costs, live."""
    from agents.base import run_agent
    from agents.web import Web
    from mesh.errors import ConfigError
    from mesh.ops.operator import ask_steps

    configure(log_level, name="web")
    s = settings(web_port=port, web_host=host)

    def asker(
        bus: Bus, question: str, messages: list[dict[str, Any]] | None
    ) -> AsyncIterator[dict[str, Any]]:
        # the operator, as `mesh ask` runs it, asking as the console's own NATS user
        return ask_steps(bus, question, s, messages, asker=s.nats_user or "web")

    try:
        agent = Web(s, asker=asker)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(run_agent(agent))


@agent_app.command("gateway")
def agent_gateway(
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """The gateway: answers escalated tasks with Claude, within budgets and rate limits."""
    from agents.base import run_agent
    from agents.gateway import Gateway

    configure(log_level, name="gateway")
    raise typer.Exit(run_agent(Gateway(settings())))


@agent_app.command("worker")
def agent_worker(
    slots: Annotated[int | None, typer.Option("--slots", help="concurrent shell tasks")] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes", help="comma list of task classes to take (default: cpu; script,llm with --gpu N)"
        ),
    ] = None,
    gpu: Annotated[
        str,
        typer.Option(
            "--gpu",
            help="the GPU this worker owns (NVML index), a set of GPUs for models bigger than one "
            "(e.g. 0,3; the first is the main GPU), or 'none' for the CPU",
        ),
    ] = "none",
    memory_mb: Annotated[
        int,
        typer.Option(
            "--memory-mb",
            help="memory model kinds may use (MB; 0: all of the GPU, or the host's free RAM; "
            "of each GPU of a set)",
        ),
    ] = 0,
    drain_timeout: Annotated[
        float, typer.Option("--drain-timeout", help="on stop, seconds to let running tasks finish")
    ] = 30.0,
    log_level: Annotated[str | None, typer.Option("--log-level")] = None,
) -> None:
    """A worker: claims tasks of its classes and runs them; with --gpu N it owns GPU N, with
    --gpu 0,3 the set of GPUs 0 and 3 (one GPU to the brain, with their memory summed)."""
    s = settings()
    from mesh.host.gpu import GpuError, gpu_environment, parse_gpus

    try:
        indices = parse_gpus(gpu)
    except GpuError as exc:
        raise fail(
            f"--gpu {exc}: e.g. --gpu 0, --gpu 0,3 for a set, or --gpu none for a CPU worker"
        ) from None

    # CUDA reads CUDA_VISIBLE_DEVICES, and the dynamic loader LD_LIBRARY_PATH, when they first
    # load: set both before anything imports a CUDA library (the loader only at exec). A value
    # this process was started with that is not the worker's own (a set's unit instance `0_3`) is
    # replaced by an exec too: llama.cpp was imported before this ran (mesh.host.preload)
    env = gpu_environment(indices, s.gpu_library_path, dict(os.environ))
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env.get("LD_LIBRARY_PATH", "") != os.environ.get("LD_LIBRARY_PATH", "") or (
        inherited is not None and inherited != env["CUDA_VISIBLE_DEVICES"]
    ):
        os.execve(sys.executable, [sys.executable, "-m", "mesh", *sys.argv[1:]], env)
    os.environ["CUDA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"]
    from agents.base import run_agent
    from agents.worker import Worker

    configure(log_level, name="worker")
    default = "script,llm" if indices else "cpu"
    wanted = tuple(c.strip() for c in (classes or default).split(",") if c.strip())
    if not wanted:
        raise fail("--classes needs at least one class")
    unknown = [c for c in wanted if c not in TASK_CLASSES]
    if unknown:
        raise fail(f"unknown class {', '.join(unknown)}; known classes: {', '.join(TASK_CLASSES)}")
    worker = Worker(
        s, classes=wanted, slots=slots, drain_timeout_s=drain_timeout, gpu=indices, memory_mb=memory_mb
    )
    try:
        code = run_agent(worker)
    except GpuError as exc:
        raise fail(str(exc)) from exc
    raise typer.Exit(code)


def agents() -> None:
    """Agents registered now (from the agents bucket)."""
    s = settings()

    async def go() -> int:
        async with connected(s) as bus:
            registered = await client.read_agents(bus)
            if not registered:
                err.print("no agent is registered: start them with `mesh up`, or their systemd units")
            now = time.time()
            for rec in registered:
                out.print(
                    f"{rec.agent_id:<40} {rec.role:<8} {rec.state:<9} seen {now - rec.seen_at:4.1f}s ago"
                    f"  running {len(rec.running)}/{rec.slots or '-'}",
                    highlight=False,
                )
            return 0

    raise typer.Exit(run(go))
