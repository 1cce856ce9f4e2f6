"""torchrun entry for test_train: `mtp train` with rank 1's clock, as train.py reads it, running 1e8
times fast, so that rank 1 alone passes any time budget (ranks keep their own clocks)."""
import os
import sys
import time
import types

from mtp_engine import train

if os.environ.get("RANK") == "1":
    _start = time.perf_counter()
    train.time = types.SimpleNamespace(perf_counter=lambda: _start + 1e8 * (time.perf_counter() - _start))

from mtp_engine.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
