"""`python -m mesh`: the `mesh` command, as the agents' systemd units and `mesh up` start it.

The same entry point as the installed `mesh` script (mesh.cli.entry).
"""

from mesh.cli import entry

entry()
