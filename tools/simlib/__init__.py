"""A discrete-event simulator of a GPU rig driving mesh's real brain (`mesh.machine.apply` and its
placement), with no NATS: `tools/simulate.py` is its command line.

- `workload`: a workload file (TOML) read, and the tasks it submits for a seed;
- `rig`: the simulated workers, the queues and the clock around `apply`;
- `metrics`: what a run measured (`simulate` runs one workload for one seed);
- `bounds`: the load and makespan bounds a run is compared with.
"""

from tools.simlib.metrics import Report, simulate
from tools.simlib.workload import Workload, WorkloadError, load, parse, tasks_of

__all__ = ["Report", "Workload", "WorkloadError", "load", "parse", "simulate", "tasks_of"]
