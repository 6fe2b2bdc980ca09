"""The host layer: what touches this machine: processes, models, devices, probes.

Executors, model loaders, NVML and psutil readings, health probes, the reaper. Imports the core only.
"""
