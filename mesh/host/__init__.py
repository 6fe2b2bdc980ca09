"""The host layer: what touches this machine: processes, models, devices, probes.

Executors, model loaders and model files, NVML and psutil readings, health probes, alert sinks,
the config file and the environment, the reaper. Imports the core only.
"""
