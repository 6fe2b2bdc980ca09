"""The agent processes: each thin wiring and a loop around the `mesh` library."""
