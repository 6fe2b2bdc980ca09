"""Running mesh as services on a host and checking it: systemd units (install-units), one round
of the health checks (health), and the host's mesh diagnosed with a fix for each problem (doctor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.markup import escape

from mesh.cli.common import err, fail, out, run, settings


def install_units(
    user: Annotated[
        bool, typer.Option("--user", help="units for `systemctl --user` (~/.config/systemd/user)")
    ] = False,
    venv: Annotated[
        str | None,
        typer.Option("--venv", "--prefix", help="the virtual environment mesh runs from (default: this one)"),
    ] = None,
    config_dir: Annotated[
        str | None,
        typer.Option("--config-dir", help="role configs (default /etc/mesh; with --user ~/.config/mesh)"),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            "--data-dir", help="server store, caches (default /var/lib/mesh; with --user ~/.local/share/mesh)"
        ),
    ] = None,
    gpus: Annotated[
        str,
        typer.Option(
            "--gpus",
            help="workers this host runs: GPU indices and/or cpu, e.g. 0,1,cpu; '+' joins GPUs into "
            "one worker's set (0+3,1,cpu: unit mesh-worker@0_3)",
        ),
    ] = "cpu",
    service_user: Annotated[
        str, typer.Option("--service-user", help="the account system units run as")
    ] = "mesh",
    drain_s: Annotated[
        float,
        typer.Option("--drain-s", help="seconds a stopping worker lets running tasks finish"),
    ] = 600.0,
    writable: Annotated[
        list[str] | None,
        typer.Option("--writable", help="a path workers' tasks may write besides the data dir (repeat)"),
    ] = None,
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="the server's port, for a new nats-server.conf")
    ] = 4222,
    out_dir: Annotated[Path | None, typer.Option("--out", help="write the units to this dir")] = None,
    install: Annotated[
        bool,
        typer.Option(
            "--install",
            help="write the units to systemd's dir, role configs where missing, then daemon-reload",
        ),
    ] = False,
) -> None:
    """Render systemd units (server, brain, workers, watchdog, gateway, health timer) for this host."""
    import dataclasses

    from mesh.ops import units

    if (out_dir is None) == (not install):
        raise fail("say where the units go: --out DIR to look at them, or --install")
    s = settings()
    base = units.default_layout(user)
    layout = dataclasses.replace(
        base,
        venv=(venv or base.venv).rstrip("/") or "/",
        config_dir=(config_dir or base.config_dir).rstrip("/"),
        data_dir=(data_dir or base.data_dir).rstrip("/"),
        service_user=service_user,
        drain_s=drain_s,
        writable=tuple(p.rstrip("/") for p in writable or ()),
        port=port,
        gpus=tuple(g.strip() for g in gpus.split(",") if g.strip()),
    )
    try:
        files = units.rendered(layout, s)
        if out_dir is not None:
            for path in units.write_units(files, out_dir):
                out.print(f"wrote {path}", highlight=False, soft_wrap=True)
            return
        units.check_binaries(layout)
        written = units.install(layout, s, files)
    except PermissionError as exc:
        hint = "" if user else ": run it as root (sudo), or add --user for units of your own"
        raise fail(f"{exc}{hint}") from None
    except (units.UnitError, OSError) as exc:
        raise fail(str(exc)) from None
    for path in written:
        out.print(f"wrote {path}", highlight=False, soft_wrap=True)
    reloaded, why = units.daemon_reload(user)
    if not reloaded:
        err.print(f"[yellow]could not reload systemd:[/yellow] {why}", highlight=False, soft_wrap=True)
    out.print("start mesh on this host with:", highlight=False, soft_wrap=True)
    out.print(f"  {units.enable_command(layout)}", highlight=False, soft_wrap=True)
    if not layout.user:
        out.print(
            "a host without a watchdog: sudo systemctl enable --now mesh-health.timer",
            highlight=False,
            soft_wrap=True,
        )


def health(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per check")] = False,
) -> None:
    """One round of the [health.NAME] checks (what the watchdog runs continuously); restarts what
    stays unhealthy and raises (or resolves) its alert: to the alert sinks and the event stream.
    Exit 1 if any check failed. mesh-health.timer runs it on hosts without a watchdog."""
    import time

    from mesh.ops.healthround import health_round

    s = settings()
    if not s.health:
        out.print(
            "no [health.NAME] checks configured (docs/watchdog.md#health-checks-and-restarts)", markup=False
        )
        raise typer.Exit(0)
    done = run(lambda: health_round(s, time.time()))
    for v in done.verdicts:
        if as_json:
            print(msgspec.json.encode(v).decode())
            continue
        state = "[green]healthy[/green]" if v.healthy else "[red]unhealthy[/red]"
        out.print(f"{v.name}: {state} ({escape(v.target)}: {escape(v.detail)})")
        if not v.healthy:
            did = "restarted" if v.restarted else "[red]not restarted[/red]"
            out.print(f"  {did}: {escape(v.restart_detail) or 'no unit or command configured'}")
    if done.not_published:
        missed = done.alerts - done.published
        err.print(
            f"{missed} alert(s) not published to the stream: {escape(done.not_published)}; "
            "spooled for the next run (see mesh doctor)"
        )
    if done.undelivered:
        err.print(f"{done.undelivered} alert(s) not delivered to every sink: spooled (see mesh doctor)")
    raise typer.Exit(0 if all(v.healthy for v in done.verdicts) else 1)


def doctor(
    quick: Annotated[
        bool, typer.Option("--quick", help="leave out the slow checks (model files, CUDA libraries)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per finding")] = False,
) -> None:
    """Check this host's mesh: server and JetStream, stream and bucket config, clocks, GPUs, models,
    disk, systemd units; each problem with its fix. Exit 1 if anything failed."""
    from rich.table import Table

    from mesh.ops.doctor import diagnose, failed

    s = settings()
    findings = run(lambda: diagnose(s, quick=quick))
    if as_json:
        for finding in findings:
            print(msgspec.json.encode(finding).decode())
    else:
        table = Table(title_justify="left", show_lines=False)
        for col in ("check", "", "finding", "fix"):
            table.add_column(col, overflow="fold")
        marks = {
            "ok": "[green]ok[/green]",
            "warn": "[yellow]warn[/yellow]",
            "fail": "[red]FAIL[/red]",
            "skip": "[dim]skip[/dim]",
        }
        for f in findings:
            table.add_row(f.check, marks[f.level], f.message, f.fix)
        out.print(table)
        counts = {level: sum(f.level == level for f in findings) for level in ("fail", "warn")}
        out.print(f"{counts['fail']} failed, {counts['warn']} warnings, {len(findings)} checks")
    raise typer.Exit(1 if failed(findings) else 0)
