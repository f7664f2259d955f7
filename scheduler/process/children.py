"""Child processes die with Corral: every process Corral starts (instances, workers,
MCP tool servers) is started with ``CHILD_PREEXEC``, and an instance's whole process
group is signalled with ``signal_group``.

On Linux a child gets PR_SET_PDEATHSIG=SIGKILL, so that it dies with Corral even when
Corral itself is SIGKILLed and no cleanup code runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that asks Linux to SIGKILL the child when Corral dies.

    libc is resolved here, before fork: the child must do nothing but the syscall.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return preexec


CHILD_PREEXEC = _pdeathsig_preexec()


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``pid`` (a child started in a session of
    its own: anything it forked shares the group); gone already is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if sig is not signal.SIGKILL:
            # A stopped child (SIGSTOP, a debugger) would leave SIGTERM pending
            # through the whole grace period.
            os.killpg(pid, signal.SIGCONT)
        os.killpg(pid, sig)
