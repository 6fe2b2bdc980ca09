"""Operator tooling: the embedded server, `mesh up`, systemd units, doctor, security, export.

It stands above the bus and host layers and below the CLI; no agent imports it.
"""
