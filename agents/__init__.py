"""The agent processes: each thin wiring and a loop around the `mesh` library.

brain, worker, watchdog, gateway, auditor and exporter, and what they share (base).
"""
