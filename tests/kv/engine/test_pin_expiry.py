"""An engine's pins live in the shared pool with their deadline (`pin_timeout_s`): when the engine's
process is SIGKILLed and never unpins, its chunks stop being protected once the timeout passes,
and not before. Real processes, a real SIGKILL, the short timeout really waited out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

from infercache.kv import Pool
from tests.helpers import destroy_pool_if_present, run_cli

SHORT_S = 2.0

PINNER = """
import sys, time, numpy as np
from infercache.kv import Engine
name, short = sys.argv[1], float(sys.argv[2])
kv = np.ones((2, 1, 8, 64), dtype="float16")  # two 4-token chunks of 1 KiB
tokens = list(range(8))
long = Engine(chunk_size=4, model_name="pin-long", pool_name=name, local_cpu_size="512K", pin_timeout_s=600)
quick = Engine(chunk_size=4, model_name="pin-short", pool_name=name, local_cpu_size="512K", pin_timeout_s=short)
for engine in (long, quick):
    engine.store(tokens, kv)
print(long.pin(tokens), quick.pin(tokens), flush=True)
time.sleep(600)
"""


def _keys(pool: Pool, model: str) -> list[str]:
    return [k for k in pool.keys() if isinstance(k, str) and k.startswith(model + "@")]


def test_pins_of_a_sigkilled_engine_lapse_after_its_timeout(data_dir) -> None:
    name = f"t-pin-{uuid.uuid4().hex[:10]}"
    proc = subprocess.Popen([sys.executable, "-c", PINNER, name, str(SHORT_S)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.split() == ["8", "8"], proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        pool = Pool.open(name)
        try:
            long_keys, short_keys = _keys(pool, "pin-long"), _keys(pool, "pin-short")
            assert len(long_keys) == len(short_keys) == 2
            deadline = max(pool.info(k)["pin_deadline"] or 0 for k in short_keys)
            for key in long_keys + short_keys:
                assert pool.info(key)["pins"] == 1  # the dead engine's pins are still in the pool ...
            # ... so before their deadline nothing evicts them (the short ones: if this machine was
            # quick enough to get here before theirs)
            pool.evict(percent=100)
            if time.time() < deadline:
                assert set(pool.keys()) == set(long_keys + short_keys)
            assert set(long_keys) <= set(pool.keys())
            assert pool.put("never", b"n" * 100) and pool.pin("never")  # no timeout: never lapses
            time.sleep(max(0.0, deadline - time.time()) + 0.1)
            assert all(pool.info(k) is None or pool.info(k)["pins"] == 0 for k in short_keys)
            long_deadline = min(pool.info(k)["pin_deadline"] for k in long_keys)
            status = json.loads(run_cli("kv", "status", name, "--format", "json", check=True).stdout)
            assert status["pinned_entries"] == 3 and status["next_pin_deadline"] == long_deadline
            for i in range(300):  # 1.2 MiB of new values into a 512 KiB pool
                assert pool.put(f"fill-{i}", bytes([i % 251]) * 4000)
            assert not set(short_keys) & set(pool.keys())  # lapsed: evicted like any other entry
            assert all(pool.info(k)["pins"] == 1 for k in long_keys + ["never"])
            assert pool.get("never") == b"n" * 100 and pool.check().ok
        finally:
            pool.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        destroy_pool_if_present(name)


def test_engine_pins_carry_pin_timeout_s_and_a_second_pin_renews(make_engine) -> None:
    from tests.kv.engine.conftest import kv_for

    engine = make_engine(local_cpu_size="1M", pin_timeout_s=60)
    tokens = list(range(8))
    engine.store(tokens, kv_for(8))
    keys = engine.db.keys(tokens)
    before = time.time()
    assert engine.pin(tokens) == 8
    first = [engine.pool.info(k)["pin_deadline"] for k in keys]
    assert all(before + 60 <= d <= time.time() + 60 for d in first)
    time.sleep(0.01)
    assert engine.pin(tokens) == 8  # pinned again: the deadline moves, the count stays one
    assert all(engine.pool.info(k)["pins"] == 1 for k in keys)
    assert all(engine.pool.info(k)["pin_deadline"] > d for k, d in zip(keys, first))
    assert engine.unpin(tokens) == 8
    assert all(engine.pool.info(k)["pins"] == 0 for k in keys)
