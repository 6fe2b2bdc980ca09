"""`mesh ask "QUESTION"`: the operator answers from the rig's own state, streamed to the terminal.
The loop and its tools are mesh.ops.operator; this prints what it yields (docs/operator.md).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.markup import escape

from mesh.cli.common import connected, err, out, run, settings


def ask(
    question: Annotated[str, typer.Argument(help='what to ask, e.g. "why is GPU 2 idle?"')],
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="the answer alone: no tool calls, no citations")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per step (text, tool, done, failed)")
    ] = False,
) -> None:
    """Ask the operator about the rig ("what failed overnight?", "why is GPU 2 idle?"). It reads
    plans, tasks, events, GPUs and their history, alerts, dead letters, `mesh doctor`, costs and
    agents' logs (read-only), through Claude at the gateway or a local model (operator_model),
    and cites what it looked at."""
    s = settings()

    async def go() -> int:
        from mesh.ops.operator import Done, Failed, Text, ToolCall, event_dict
        from mesh.ops.operator import ask as operator_ask

        code = 0
        async with connected(s) as bus:
            async for event in operator_ask(bus, question, s, asker=s.nats_user or "cli"):
                if as_json:
                    print(json.dumps(event_dict(event)), flush=True)
                    if isinstance(event, Failed):
                        code = 1
                    continue
                match event:
                    case Text():
                        sys.stdout.write(event.text)
                        sys.stdout.flush()
                    case ToolCall() if not quiet:
                        args = json.dumps(event.input, separators=(",", ":")) if event.input else ""
                        mark = "[red]✗[/red]" if event.error else "[dim]→[/dim]"
                        what = f"[cyan]{escape(event.name)}[/cyan]{escape(args)}"
                        err.print(f"{mark} {what} [dim]{escape(event.looked_at)}[/dim]", highlight=False)
                    case Done():
                        sys.stdout.write("\n")
                        if not quiet:
                            if event.looked_at:
                                out.print("[dim]looked at:[/dim]", highlight=False)
                                for line in dict.fromkeys(event.looked_at):
                                    out.print(f"[dim]  - {escape(line)}[/dim]", highlight=False, markup=True)
                            cost = f", ${event.cost_usd:.4f}" if event.cost_usd else ""
                            used = f"{event.tokens_in} tokens in, {event.tokens_out} out{cost}"
                            out.print(f"[dim]{event.turns} turn(s), {used}[/dim]", highlight=False)
                    case Failed():
                        err.print(
                            f"[red]no answer ({escape(event.reason)}):[/red] {escape(event.error)}",
                            highlight=False,
                            markup=True,
                        )
                        code = 1
        return code

    raise typer.Exit(run(go))
