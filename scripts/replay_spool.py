#!/usr/bin/env python3
"""Deliver the tracking records a job spooled but its receivers did not get: ``fl-ray replay`` as a script.

Rebuilds the job's receivers from <job dir>/config.yaml (or only the one named with --to) and sends
each one every record of <job dir>/spool/ past its progress mark (fl_ray/replay.py). Exit status: 0 when
everything was delivered, 1 when some records could not be, 2 for a bad job directory or command line.
"""

from __future__ import annotations

import sys

from fl_ray.cli import replay_main as main
from fl_ray.replay import replay

__all__ = ["main", "replay"]

if __name__ == "__main__":
    sys.exit(main())
