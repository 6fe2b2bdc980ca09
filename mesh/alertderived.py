"""The alert metrics one sample cannot give alone: swap traffic per second (from the counters of
consecutive host samples) and a GPU's XID events within a window (from its running count).

Pure: samples and their times go in, metrics come out; `mesh.alerts.AlertEngine` keeps one
`Derived` and merges what it gives with each sample's own metrics. The times are the samples'
`at` (swap) and the engine's `now` (XID window), so tests feed them and never wait.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from mesh.samples import GpuSample, HostSample


@dataclass
class Derived:
    # XID events count toward `gpu_xid_recent` this long after they were seen
    xid_window_s: float = 3600.0
    # host -> (at, MB swapped in and out since boot) of its previous sample
    _swap: dict[str, tuple[float, float]] = field(default_factory=dict)
    # GPU id -> the count of XID events its previous sample carried
    _xid_count: dict[str, int] = field(default_factory=dict)
    # GPU id -> (when seen, how many new) within the window
    _xid_seen: dict[str, collections.deque[tuple[float, int]]] = field(default_factory=dict)

    def host(self, s: HostSample) -> dict[str, float | None]:
        """`swap_io_mb_s`: MB swapped in and out per second since the host's previous sample
        (None for its first, or when the counters went back: a reboot)."""
        if s.swap_in_mb is None or s.swap_out_mb is None:
            return {"swap_io_mb_s": None}
        total = s.swap_in_mb + s.swap_out_mb
        previous = self._swap.get(s.host)
        self._swap[s.host] = (s.at, total)
        if previous is None or s.at <= previous[0] or total < previous[1]:
            return {"swap_io_mb_s": None}
        return {"swap_io_mb_s": (total - previous[1]) / (s.at - previous[0])}

    def gpu(self, s: GpuSample, now: float) -> dict[str, float | None]:
        """`gpu_xid_recent`: XID events seen on the GPU within `xid_window_s` of `now`. The
        count a sample carries runs from the watchdog's start, so the first one counts in full."""
        if s.xid_errors is None:
            return {"gpu_xid_recent": None}
        gpu = s.gpu_id
        seen = self._xid_seen.setdefault(gpu, collections.deque())
        previous = self._xid_count.get(gpu, 0)
        if s.xid_errors > previous:
            seen.append((now, s.xid_errors - previous))
        self._xid_count[gpu] = s.xid_errors
        while seen and now - seen[0][0] >= self.xid_window_s:
            seen.popleft()
        return {"gpu_xid_recent": float(sum(n for _, n in seen))}
