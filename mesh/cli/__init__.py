"""The `mesh` command: one module per command group, each parsing, calling the library and rendering;
here every command is registered on the app, in the order `mesh --help` lists them.

`app` is the typer application; `entry` runs it. The groups: plans (check, submit, status, cancel,
retry), outputs (output), history (tail, replay, dead, costs, export), setup (init, up), agents
(`mesh agent ROLE`, agents), gpus (`mesh gpu ...`, gpus, top), models (models, `mesh models push`),
services (install-units, health, doctor), report (report); `common` holds what they share, `render`
and `top` how things look.
"""

from mesh.cli import agents, ask, gpus, history, models, outputs, plans, report, services, setup
from mesh.cli.common import app, entry

app.command()(plans.check)
app.command()(plans.submit)
app.command()(plans.status)
app.command()(plans.cancel)
app.command()(plans.retry)
app.command()(outputs.output)
app.command()(history.tail)
app.command()(history.replay)
app.command()(history.dead)
app.command()(history.costs)
app.command()(report.report)
app.command()(setup.init)
app.command()(setup.up)
app.command()(agents.agents)
app.command()(gpus.gpus)
app.command()(gpus.top)
app.command("install-units")(services.install_units)
app.command()(services.health)
app.command("export")(history.export_cmd)
app.command()(services.doctor)
app.command()(ask.ask)
app.add_typer(agents.agent_app, name="agent")
app.add_typer(gpus.gpu_app, name="gpu")
app.add_typer(models.models_app, name="models")

__all__ = ["app", "entry"]
