"""Fault injection for the crash tests: ``OARS_FAULT=<point>:<step>`` SIGKILLs the process there.

Points: ``train`` (at the start of step/iteration ``step``, before any of its work) and ``save``
(while writing checkpoint ``step``: every rank's files and the weights written, marker not yet).
Unset in normal runs; the check is one environment lookup.
"""
from __future__ import annotations

import os
import signal


def maybe_fail(point: str, step: int) -> None:
    if os.environ.get("OARS_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
