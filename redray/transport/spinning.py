"""When a thread waiting for a reply should poll for it instead of sleeping.

Waking a sleeping thread on another CPU costs the *sender* of the reply an inter-processor
interrupt, and on virtual machines that is slow: 10–50 µs of the sender's system call, then
the sleeper's own wake-up. For a synchronous call that round trip is most of the cost (a
2-core VM: ~160 µs a call sleeping, ~70 µs polling). So a thread blocked in `Reactor.block`
polls the loop for up to SPIN_SECONDS first — but only when that is likely to pay and cheap:

- its recent waits were short (a typical wait under SPIN_SECONDS), so the reply usually comes
  while it polls; after long waits it sleeps at once;
- a CPU is free (runnable threads, system-wide, at most the CPUs this process may use), so
  polling does not take a CPU from the process it waits for; on a busy machine it sleeps.

`REDRAY_SPIN_US=0` turns polling off.
"""

from __future__ import annotations

import os
import time

SPIN_SECONDS = float(os.environ.get("REDRAY_SPIN_US", "200")) / 1e6
_CPU_CHECK_SECONDS = 0.005  # /proc/loadavg is read at most this often
_loadavg: int | None = None  # /proc/loadavg, opened once per process (every policy reads it)


class SpinPolicy:
    """Whether to poll before sleeping; learns the typical wait of the waits it is told of."""

    def __init__(self) -> None:
        self.typical_wait = 0.0
        self._checked_at = float("-inf")
        self._cpu_free = False
        try:
            self._cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self._cpus = os.cpu_count() or 1

    def budget(self) -> float:
        """Seconds to poll before sleeping (0: sleep at once)."""
        if SPIN_SECONDS <= 0 or self.typical_wait >= SPIN_SECONDS:
            return 0.0
        return SPIN_SECONDS if self._a_cpu_is_free() else 0.0

    def waited(self, seconds: float) -> None:
        """Record how long a wait took (from the moment the waiter started to lead)."""
        self.typical_wait += (seconds - self.typical_wait) * 0.125

    def _a_cpu_is_free(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at < _CPU_CHECK_SECONDS:
            return self._cpu_free
        self._checked_at = now
        self._cpu_free = self._runnable() <= self._cpus
        return self._cpu_free

    def _runnable(self) -> int:
        """Threads runnable system-wide now, this one included (Linux); else a large number."""
        global _loadavg
        try:
            if _loadavg is None:
                _loadavg = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
            # "0.50 0.40 0.30 2/345 6789": the 4th field is running/total
            fields = os.pread(_loadavg, 128, 0).split()
            return int(fields[3].split(b"/")[0])
        except (OSError, IndexError, ValueError):
            return 1 << 30
