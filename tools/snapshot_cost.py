"""What the brain's snapshot costs, in process: building a whole one of N no-op task records,
building one after a page's worth of changes, and reading one back (decode, compact, load).

    .venv/bin/python tools/snapshot_cost.py                     # 1,000,000 records
    .venv/bin/python tools/snapshot_cost.py --records 100000

No server: this times the encoding and decoding the brain does (the values' trip to and from
the server is in tools/bench_scale.py's restart figure).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.events import TaskSpec  # noqa: E402
from mesh.machine_state import State, compact_record  # noqa: E402
from mesh.records import PlanRecord, TaskRecord  # noqa: E402
from mesh.snapshot import PAGE, Snapshots, chunk_key, decode_page  # noqa: E402

PLAN = "plan-0000000000-snap"


def state_of(n: int) -> State:
    """n no-op tasks, the first 30% succeeded, the rest waiting (a plan a third of the way)."""
    tasks = []
    for i in range(n):
        task_id = sys.intern(f"t{i}")
        done = i < n * 0.3
        tasks.append(
            TaskRecord(
                plan_id=PLAN,
                task_id=task_id,
                spec=TaskSpec(id=task_id, body=""),
                index=i,
                status="succeeded" if done else "waiting",
                attempt=1 if done else 0,
                worker="worker-host-1-ab12" if done else "",
                waiting_since=1.7e9,
                released_at=1.7e9 + i / 1000 if done else 0.0,
                finished_at=1.7e9 + i / 1000 + 0.01 if done else 0.0,
                duration_s=0.004 if done else 0.0,
                updated_at=1.7e9 + i / 1000,
            )
        )
    plan = PlanRecord(plan_id=PLAN, title="snapshot cost", status="running", total=n)
    return State.load(tasks, [plan])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    state = state_of(args.records)
    out: dict[str, float] = {"records": args.records}

    snaps = Snapshots()
    snaps.touch_all(state)
    t0 = time.perf_counter()
    built = snaps.build(state, seq=1, at=0.0, brain="bench", max_chunk=4 * 1024 * 1024)
    out["whole_build_s"] = round(time.perf_counter() - t0, 3)
    out["whole_bytes"] = sum(len(v) for _, v in built.puts)
    out["whole_values"] = len(built.puts)
    snaps.written(built)

    keys = state.plan_keys[PLAN]
    changed = [state.tasks[k] for k in keys[int(args.records * 0.3) : int(args.records * 0.3) + PAGE]]
    snaps.touch(changed, plans=True)
    t0 = time.perf_counter()
    later = snaps.build(state, seq=2, at=0.0, brain="bench", max_chunk=4 * 1024 * 1024)
    out["later_build_s"] = round(time.perf_counter() - t0, 4)
    out["later_records_encoded"] = later.encoded

    values = dict(built.puts)
    t0 = time.perf_counter()
    floats: dict[float, float] = {}
    tasks: list[TaskRecord] = []
    plans: list[PlanRecord] = []
    for ref in built.head.pages:
        data = b"".join(values[chunk_key(ref.name, ref.slot, k)] for k in range(ref.chunks))
        for rec in decode_page(ref, data):
            if isinstance(rec, TaskRecord):
                tasks.append(compact_record(rec, floats))
            elif isinstance(rec, PlanRecord):
                plans.append(rec)
    out["read_decode_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    State.load(tasks, plans, compacted=True)
    out["read_load_s"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
