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
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import destroy_pool_if_present, run_cli
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
    destroy_pool_if_present(name, data_dir)


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
    for r, proc in enumerate(readers):  # both readers attached before any writer starts
        ready = Path(f"{stop_file}.ready{r}")
        for _ in range(WORKER_TIMEOUT * 100):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert ready.exists(), f"reader {r} never attached: {proc.poll()}"
    writers = [_spawn("writer", pool_name, w, count, small, large, shared, rounds) for w in (0, 1)]
    writer_results = [_finish(p)[-1] for p in writers]
    stop_file.touch()
    reader_results = [_finish(p)[-1] for p in readers]

    for res in writer_results:
        assert res["puts"] == (count + shared) * rounds
        assert res["failed"] == 0, "the pool is big enough: no put may fail"
    for res in reader_results:
        assert res["hits"] >= 200, res
        assert res["views"] > 0, "half the reads go through the zero-copy view"
    assert sum(res["early_hits"] for res in reader_results) > 0, "readers verified values while writers wrote"

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


def test_writers_overfilling_a_small_pool_evict_across_processes(pool_name: str, tmp_path: Path) -> None:
    """Two writers put ~10x the pool's size while two readers read: eviction runs all the time.

    No put may fail or hang (there is always something evictable), no reader may see a
    torn or foreign value, and the pool stays within its size and consistent.
    """
    _cli_create(pool_name, "8M", "--policy", "s3fifo")
    count, shared, rounds, small, large = 200, 20, 2, 20_000, 200_000
    keys = [f"w{w}-k{i}" for w in (0, 1) for i in range(count)] + [f"shared-k{i}" for i in range(shared)]
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(keys))
    stop_file = tmp_path / "stop"
    readers = [_spawn("reader", pool_name, r, keys_file, stop_file, 20, 100_000) for r in (0, 1)]
    writers = [_spawn("writer", pool_name, w, count, small, large, shared, rounds) for w in (0, 1)]
    writer_results = [_finish(p)[-1] for p in writers]
    stop_file.touch()
    reader_results = [_finish(p)[-1] for p in readers]
    assert all(res["failed"] == 0 for res in writer_results), writer_results
    assert all(res["hits"] >= 20 for res in reader_results), reader_results

    from infercache.kv import Pool

    pool = Pool.open(pool_name)
    try:
        stats = pool.stats()
        assert stats["evictions"] > 0 and stats["used_bytes"] <= stats["size_bytes"]
        assert 0 < stats["entries"] < len(keys)
        present = 0
        for key in keys:
            value = pool.get(key)
            if value is not None:
                verify_value(key, value)
                present += 1
        assert present == stats["entries"]
        report = pool.check()
        assert report.ok, report.problems
    finally:
        pool.close()


def _done_keys(lines: list[str]) -> list[str]:
    """Keys the victim announced as put, from its stdout lines (the last may be cut by the kill)."""
    done = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if "done" in record:
            assert record["ok"], f"put of {record['done']} failed in a pool with room"
            done.append(record["done"])
    return done


def _kill_during_put(pool_name: str, victim: int, small: int, large: int, after: int, delay: float) -> list[str]:
    """Start a streaming writer, let `after` puts complete, SIGKILL it `delay` s into the next one.

    Returns the keys it announced as done. time.sleep here is not an assertion: it only
    picks an instant inside a put (a 32 MiB put takes milliseconds).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kv.kvworker", "stream", pool_name, str(victim), str(small), str(large), "10000"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        lines = [proc.stdout.readline()]  # {"ready": true}: attached, values made
        assert json.loads(lines[0])["ready"], lines[0]
        starts = 0
        while starts <= after:  # the (after+1)-th "start" line: that put is under way
            lines.append(proc.stdout.readline())
            starts += '"start"' in lines[-1]
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=WORKER_TIMEOUT) == -signal.SIGKILL
        lines += proc.stdout.read().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    return _done_keys(lines[1:])


def test_sigkill_writer_mid_put_leaves_consistent_pool(
    pool_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL writers inside puts (0.1-1.5 MiB values, then 32 MiB ones), six times.

    After each kill: `check` finds the pool consistent, every put the victim announced as
    done is intact, the one in flight is missing or intact (never torn), the parent keeps
    putting, and a survivor process that runs across all the kills keeps putting and
    reading, before and after them.
    """
    _cli_create(pool_name, "256M")
    go_file = tmp_path / "go"
    survivor = _spawn("survivor", pool_name, 9, 1000, 20_000, 60, go_file, WORKER_TIMEOUT - 30)
    rng = random.Random(4)
    from infercache.kv import Pool

    all_done: list[str] = []
    plans = [(100_000, 1_500_000, rng.randint(1, 6), rng.uniform(0, 0.002)) for _ in range(4)]
    plans += [(32 << 20, 32 << 20, 1, 0.003), (32 << 20, 32 << 20, 0, 0.0)]
    for victim, (small, large, after, delay) in enumerate(plans):
        done = _kill_during_put(pool_name, victim, small, large, after, delay)
        assert len(done) >= after, "the victim announced fewer puts than it had finished"
        all_done.extend(done)

        pool = Pool.open(pool_name)  # attaching reclaims a dead writer's reservation
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
            key = f"parent-{victim}"  # the parent itself keeps using the pool after the kill
            assert pool.put(key, make_value(key, 7, victim, 50_000))
            verify_value(key, pool.get(key))
        finally:
            pool.close()

    go_file.touch()
    result = _finish(survivor)[-1]
    assert result["done"] == 60

    pool = Pool.open(pool_name)
    try:
        report = pool.check()
        assert report.ok, report.problems
        rebuilds_seen_anywhere = pool.stats()["repairs"]  # by any process that found a dirty header
        for key in all_done:
            verify_value(key, pool.get(key))
        for i in range(60):
            verify_value(f"v9-k{i}", pool.get(f"v9-k{i}"))
        for key in pool.keys():  # in-flight puts that did get published are whole too
            if str(key).startswith("s"):
                verify_value(str(key), pool.get(key))
    finally:
        pool.close()
    # and a fresh process (the CLI) finds it consistent too
    assert run_cli("kv", "check", pool_name).returncode == 0
    messages = [r.getMessage() for r in caplog.records]
    reclaimed = sum("reclaimed" in m for m in messages)
    rebuilt = sum("rebuilding derived state" in m for m in messages)
    # informative only (where a kill lands is up to the scheduler): -s shows which recovery paths ran
    print(f"{len(plans)} kills: {reclaimed} unpublished reservations reclaimed here, {rebuilt} died-in-update "
          f"rebuilds here, {rebuilds_seen_anywhere} rebuilds by any process")  # fmt: skip


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


_REPLACER = """
import sys
from infercache.kv import Pool

pool = Pool.open(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    i += 1
    fill = bytes([i % 251])
    pool.put("hot", fill * 3000)  # the same block count every time: slot and blocks are taken over
    pool.put(f"cold-{i % 50}", fill * (1000 + i % 7))  # one or two blocks: taken over or reallocated
"""


def test_sigkill_during_replacements_leaves_consistent_pool(pool_name: str, data_dir: Path) -> None:
    """A writer replacing small values in a loop (the in-place fast path of a put) is SIGKILLed six
    times at random moments: each time `check` is clean, every value present is one whole version,
    and this process keeps using the pool."""
    from infercache.kv import Pool

    pool = Pool.create(pool_name, size="4M", data_dir=data_dir)
    rng = random.Random(7)
    try:
        for _ in range(6):
            proc = subprocess.Popen([sys.executable, "-c", _REPLACER, pool_name], cwd=REPO, stdout=subprocess.PIPE,
                                    text=True, env=os.environ.copy())  # fmt: skip
            try:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
                time.sleep(rng.uniform(0.05, 0.3))
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=WORKER_TIMEOUT) == -signal.SIGKILL
            finally:
                if proc.poll() is None:
                    proc.kill()
            report = pool.check()
            assert report.ok, report.problems
            hot = pool.get("hot")
            assert hot is None or (len(hot) == 3000 and len(set(hot)) == 1)
            for j in range(50):
                value = pool.get(f"cold-{j}")
                assert value is None or (1000 <= len(value) <= 1006 and len(set(value)) == 1)
            assert pool.put("hot", b"p" * 3000) and pool.get("hot") == b"p" * 3000
    finally:
        pool.close()
