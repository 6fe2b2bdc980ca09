"""Check GPU power caps on real hardware: through the watchdog's own NVML source, read a GPU's
allowed range and limit, set a cap, read it back, refuse one outside the range, and put the
limit back as it was. Needs root (NVML lets only root set a limit).

    sudo .venv/bin/python tools/power_check.py --gpu 0              # cap: halfway down the range
    sudo .venv/bin/python tools/power_check.py --gpu 0 --watts 140 --json power-check.json

Prints each step; exits 1 when a step does not do what it should.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.host.telemetry import NvmlSource, PowerSetError, open_source  # noqa: E402
from mesh.power import TOLERANCE_W  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", type=int, default=0, help="the GPU's NVML index")
    ap.add_argument("--watts", type=float, default=0.0, help="the cap (default: between min and default)")
    ap.add_argument("--json", default="", help="write what was read and set here")
    args = ap.parse_args()
    source = open_source("check")
    if not isinstance(source, NvmlSource):
        print("no NVIDIA GPU readable through NVML here")
        return 1
    found: dict[str, Any] = {"gpu": args.gpu, "name": source.sample(args.gpu).name}
    ok = True
    try:
        rng = source.power_range(args.gpu)
        before = source.power_limit(args.gpu)
        found.update(min_w=rng.min_w, max_w=rng.max_w, default_w=rng.default_w, limit_before_w=before)
        allowed = f"allowed {rng.min_w:g}-{rng.max_w:g} W, default {rng.default_w:g} W"
        print(f"{found['name']}: {allowed}, now {before} W")
        cap = args.watts or round((rng.min_w + rng.default_w) / 2)
        began = time.monotonic()
        source.set_power_limit(args.gpu, cap)
        after = source.power_limit(args.gpu)
        enforced = source.sample(args.gpu).power_limit_w
        found.update(
            cap_w=cap, read_back_w=after, enforced_w=enforced, set_s=round(time.monotonic() - began, 4)
        )
        good = after is not None and abs(after - cap) <= TOLERANCE_W
        ok &= good
        print(
            f"set {cap:g} W: reads back {after} W, enforced {enforced} W ({'ok' if good else 'NOT the cap'})"
        )
        outside = rng.max_w + 100
        problem = rng.problem(outside)
        found["refused"] = problem
        ok &= bool(problem)
        print(f"{outside:g} W: {problem or 'NOT refused'}")
        source.set_power_limit(args.gpu, before if before is not None else rng.default_w)
        found["limit_after_w"] = source.power_limit(args.gpu)
        print(f"put back: {found['limit_after_w']} W")
    except PowerSetError as exc:
        found["error"] = str(exc)
        print(exc)
        ok = False
    finally:
        source.close()
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
