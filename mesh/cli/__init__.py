"""The `mesh` command: one module per command group, each parsing, calling the library and rendering.

`app` is the typer application; `entry` runs it.
"""

from mesh.cli.app import app, entry

__all__ = ["app", "entry"]
