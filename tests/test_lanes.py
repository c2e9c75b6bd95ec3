"""The lanes' threads: index-time work runs below the query path in CPU priority."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from tandem.server.engine.lanes import LANE_NAMES, Lanes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_lowered_lane_runs_below_the_others() -> None:
    base = thread_nice()
    if base > 14:
        pytest.skip(f"this process already runs at nice {base}: no room to lower a lane by 5")
    lanes = Lanes.threaded({"ingest": 5})

    async def nices() -> dict[str, int]:
        return {name: await lanes.run(name, thread_nice) for name in LANE_NAMES}

    try:
        seen = asyncio.run(nices())
    finally:
        lanes.shutdown()
    assert seen == {name: base + 5 if name == "ingest" else base for name in LANE_NAMES}
