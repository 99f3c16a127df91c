"""One pool, many unrelated processes: concurrent writers and readers, SIGKILL mid-put, CLI-made pools.

Every worker is a fresh interpreter started with subprocess (`tests/kv/kvworker.py`),
attaching by name, so nothing is shared except the pool itself.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.kv.kvworker import length_for, make_value, verify_value

REPO = Path(__file__).resolve().parents[2]
WORKER_TIMEOUT = 300  # a hung worker (deadlock, busy-wait) fails the test instead of hanging the suite


def _spawn(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.kv.kvworker", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def _finish(proc: subprocess.Popen[str]) -> list[dict]:
    try:
        out, err = proc.communicate(timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"worker {proc.args} hung (deadlock?)\nstderr:{err}")
    assert proc.returncode == 0, f"worker {proc.args} exited {proc.returncode}\nstderr:{err}"
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture()
def pool_name(data_dir: Path):
    """A unique pool name (pools under /dev/shm are host-wide); destroyed afterwards."""
    name = f"t-mp-{uuid.uuid4().hex[:10]}"
    yield name
    from infercache.kv import Pool

    try:
        Pool.destroy(name, data_dir=data_dir)
    except Exception:  # already deleted by the test, or never created
        pass


def _cli_create(name: str, size: str = "64M", *extra: str) -> None:
    run_cli("kv", "create", name, "--size", size, *extra, check=True)


def test_two_writers_two_readers_every_value_verified(pool_name: str, tmp_path: Path) -> None:
    _cli_create(pool_name, "64M")
    count, shared, rounds, small, large = 150, 40, 3, 1000, 40_000
    keys = [f"w{w}-k{i}" for w in (0, 1) for i in range(count)] + [f"shared-k{i}" for i in range(shared)]
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys))
    stop_file = tmp_path / "stop"

    readers = [_spawn("reader", pool_name, r, keys_file, stop_file, 200, 100_000) for r in (0, 1)]
    writers = [_spawn("writer", pool_name, w, count, small, large, shared, rounds) for w in (0, 1)]
    writer_results = [_finish(p)[-1] for p in writers]
    stop_file.touch()
    reader_results = [_finish(p)[-1] for p in readers]

    for res in writer_results:
        assert res["puts"] == (count + shared) * rounds
        assert res["failed"] == 0, "the pool is big enough: no put may fail"
    for res in reader_results:
        assert res["hits"] >= 200, res  # each reader verified values while writers ran

    from infercache.kv import Pool

    pool = Pool.open(pool_name)
    try:
        for key in keys:
            value = pool.get(key)
            assert value is not None, f"{key} missing after both writers finished"
            writer, generation = verify_value(key, value)
            assert generation == rounds - 1, f"{key}: stale generation {generation}"
            if key.startswith("w"):
                assert writer == int(key[1])
        stats = pool.stats()
        assert stats["entries"] == len(keys)
        report = pool.check()
        assert report.ok, report.problems
    finally:
        pool.close()


def _read_done_keys(proc: subprocess.Popen[str]) -> list[str]:
    out, _err = proc.communicate(timeout=WORKER_TIMEOUT)
    done = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the kill
        if "done" in record:
            assert record["ok"], f"put of {record['done']} failed in a pool with room"
            done.append(record["done"])
    return done


def test_sigkill_writer_mid_stream_leaves_consistent_pool(pool_name: str, tmp_path: Path) -> None:
    """Kill a writer streaming 0.1-1.5 MiB puts at arbitrary moments, several times.

    After each kill: `check` finds the pool consistent, every put the victim announced as
    done is intact, the one in flight is missing or intact (never torn), and a survivor
    process that ran across the kills goes on putting and reading.
    """
    _cli_create(pool_name, "256M")
    small, large = 100_000, 1_500_000
    go_file = tmp_path / "go"
    survivor = _spawn("survivor", pool_name, 9, 1000, 20_000, 60, go_file, WORKER_TIMEOUT - 30)
    rng = random.Random(4)
    from infercache.kv import Pool

    all_done: list[str] = []
    kills = 5
    for victim in range(kills):
        proc = _spawn("stream", pool_name, victim, small, large, 10_000)
        assert proc.stdout is not None
        first = proc.stdout.readline()  # {"ready": true}: attached, about to put
        assert json.loads(first)["ready"], first
        for _ in range(rng.randint(1, 6)):  # let a few puts through, then kill at a random point
            proc.stdout.readline()
        # time.sleep is not an assertion: it only picks an arbitrary instant inside a put
        import time

        time.sleep(rng.uniform(0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)
        done = _read_done_keys(proc)
        assert proc.returncode == -signal.SIGKILL
        assert done, "the victim completed no put before the kill"
        all_done.extend(done)

        pool = Pool.open(pool_name)
        try:
            report = pool.check()
            assert report.ok, f"after kill #{victim}: {report.problems}"
            for key in done:
                value = pool.get(key)
                assert value is not None, f"{key} was announced done, lost after the kill"
                verify_value(key, value)
            in_flight = f"s{victim}-k{len(done)}"
            value = pool.get(in_flight)
            if value is not None:  # published before the kill: must then be whole
                verify_value(in_flight, value)
            # the parent itself keeps using the pool after the kill
            key = f"parent-{victim}"
            assert pool.put(key, make_value(key, 7, victim, 50_000))
            verify_value(key, pool.get(key))
        finally:
            pool.close()

    go_file.touch()
    result = _finish(survivor)[-1]
    assert result["done"] == 60

    pool = Pool.open(pool_name)
    try:
        assert pool.check().ok
        for key in all_done:
            verify_value(key, pool.get(key))
        for i in range(60):
            verify_value(f"v9-k{i}", pool.get(f"v9-k{i}"))
    finally:
        pool.close()
    # and a fresh process still works on it
    assert run_cli("kv", "check", pool_name).returncode == 0


def test_pool_created_by_cli_is_used_by_other_processes(pool_name: str, tmp_path: Path) -> None:
    _cli_create(pool_name, "16M", "--policy", "lfu")
    values = {f"key-{i}": make_value(f"key-{i}", 1, 0, length_for(f"key-{i}", 10, 300_000)) for i in range(5)}
    spec = {}
    for key, value in values.items():
        (tmp_path / f"{key}.in").write_bytes(value)
        spec[key] = str(tmp_path / f"{key}.in")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    _finish(_spawn("put", pool_name, tmp_path / "spec.json"))

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = _finish(_spawn("get", pool_name, out_dir, *values, "never-put"))[-1]
    assert result["missing"] == ["never-put"]
    for key, value in values.items():
        assert (out_dir / f"{key}.bin").read_bytes() == value

    status = json.loads(run_cli("kv", "status", pool_name, "--format", "json", check=True).stdout)
    assert status["entries"] == 5
    assert status["policy"] == "lfu"
    assert status["used_bytes"] >= sum(len(v) for v in values.values())
    assert status["hits"] >= 5 and status["misses"] >= 1  # counters live in the pool, not in one process
