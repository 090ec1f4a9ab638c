#!/usr/bin/env python
"""`make gpu-check`: everything a lent CUDA GPU machine should prove, in one command, in under 8 minutes.

    make gpu-check                      (on the GPU machine: carried wheels installed offline, then this script)
    GPU_CHECK_OUT=DIR python benchmarks/gpu_check.py [--skip-benchmarks] [--dry-run]
    python benchmarks/gpu_check.py --rehearse       (on a CPU: every step that does not need CUDA; CI's floor leg)
    python benchmarks/gpu_check.py --download-wheels  (here, with network: the wheels to carry, into wheels/gpu)
    python benchmarks/gpu_check.py --why-not        (prints why this machine cannot run it, or nothing)

The steps, their time limits and the rehearsal are in caitdeploy/testing/gpu_check.py (the tests import them from
there); this is its command line. caitdeploy must be importable: installed, or PYTHONPATH=. as `make gpu-check` sets.
"""

from __future__ import annotations

import sys

from caitdeploy.testing.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
