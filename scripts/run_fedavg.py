#!/usr/bin/env python3
"""Run a federated averaging job on Ray: ``fl-ray run`` (see fl_ray/cli.py), as a script.

With no arguments: configs/fedavg_digits.yaml on a local Ray instance, results under ./workspace.
Exit status: 0 on success, 1 if the job failed, 2 for a bad config or command line. Secrets given on the
command line (``--set tracking.credentials.MLFLOW_TRACKING_PASSWORD=...``) are masked in what it prints.
"""

from __future__ import annotations

import sys

from fl_ray.cli import run_main as main

if __name__ == "__main__":
    sys.exit(main())
