"""The hot tier is one shared-memory pool: engines in separate processes share it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np

from tests.kv.engine.conftest import kv_for

STORE = """
import sys, numpy as np
from infercache.kv import Engine
rng = np.random.default_rng(7)
kv = rng.standard_normal((2, 2, 12, 8)).astype("float16")
with Engine(chunk_size=4, model_name="shared-m", pool_name=sys.argv[1], local_cpu_size="4M") as e:
    print(e.store(list(range(12)), kv))
"""

RACE = """
import sys, time
from infercache.kv import Engine
start = float(sys.argv[2])
while time.time() < start:
    pass
with Engine(chunk_size=4, model_name="race", pool_name=sys.argv[1], local_cpu_size="4M") as e:
    print(e.store([int(sys.argv[3])] * 4, __import__("numpy").ones((2, 1, 4, 4), dtype="float16")))
"""


def test_chunk_stored_by_one_process_is_retrieved_by_another(make_engine, data_dir) -> None:
    name = f"t-eng-{uuid.uuid4().hex[:10]}"
    done = subprocess.run([sys.executable, "-c", STORE, name], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["12"]
    engine = make_engine(model_name="shared-m", pool_name=name)
    assert not engine._tiers["hot"].created  # attached to the pool the other process made
    mask, out = engine.retrieve(list(range(12)))
    expected = np.random.default_rng(7).standard_normal((2, 2, 12, 8)).astype("float16")
    assert bool(mask.all()) and np.array_equal(out, expected)


def test_default_pool_is_shared_by_model_world_size_and_worker(make_engine, data_dir) -> None:
    model = f"m{uuid.uuid4().hex[:6]}"
    a = make_engine(model_name=model, pool_name=None)
    b = make_engine(model_name=model, pool_name=None)
    other = make_engine(model_name=model, pool_name=None, world_size=2, worker_id=1)
    try:
        assert a.pool.name == b.pool.name != other.pool.name
        a.store(list(range(8)), kv_for(8))
        assert b.lookup(list(range(8))) == 8
        assert other.lookup(list(range(8))) == 0
    finally:
        from infercache.kv import Pool

        for engine in (a, b, other):
            engine.close()
        for name in {a.pool.name, other.pool.name}:
            Pool.destroy(name, data_dir=data_dir)


def test_two_processes_creating_the_same_pool_at_once(make_engine, data_dir) -> None:
    import time

    name = f"t-eng-{uuid.uuid4().hex[:10]}"
    start = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", RACE, name, start, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for i in (1, 2)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert [o[0].split() for o in outs] == [["4"], ["4"]]
    engine = make_engine(model_name="race", pool_name=name)
    assert engine.lookup([1] * 4) == 4 and engine.lookup([2] * 4) == 4
