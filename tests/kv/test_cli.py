"""`infercache kv ...` end to end, as a user runs it: each command is its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import destroy_pool_if_present, run_cli
from tests.kv.kvworker import length_for, make_value

REPO = Path(__file__).resolve().parents[2]
SPEC_STATUS_KEYS = {
    "name", "tier", "size_bytes", "used_bytes", "free_bytes", "utilization",
    "entries", "policy", "hits", "misses", "evictions", "path",
}  # fmt: skip


@pytest.fixture()
def names(data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Unique pool names (pools under /dev/shm are host-wide); every one destroyed afterwards."""
    monkeypatch.setenv("COLUMNS", "400")  # Rich wraps at 80 columns otherwise: keep messages on one line
    made: list[str] = []

    def new(prefix: str = "t-cli") -> str:
        made.append(f"{prefix}-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield new
    for name in made:
        destroy_pool_if_present(name, data_dir)


def _py(code: str) -> subprocess.CompletedProcess[str]:
    """Run Python code in another process (the pool must be reachable by name from there)."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    assert result.returncode == 0, result.stderr
    return result


def _json(*args: str):
    result = run_cli(*args, check=True)
    return json.loads(result.stdout)


def _status(name: str) -> dict:
    return _json("kv", "status", name, "--format", "json")


def _fill(name: str, count: int, size: int, pin: str | None = None) -> None:
    """Put keys k0..k{count-1} of `size` bytes each (in this process: the CLI made the pool)."""
    from infercache.kv import Pool

    with Pool.open(name) as pool:
        for i in range(count):
            assert pool.put(f"k{i}", bytes([i % 251]) * size)
        if pin is not None:
            assert pool.pin(pin)


def _keys_present(name: str, keys: list[str]) -> set[str]:
    from infercache.kv import Pool

    with Pool.open(name) as pool:
        return {k for k in keys if pool.contains(k)}


def _stats(name: str) -> dict:
    """In-process stats, where the test is about the effect of a command, not `status` itself."""
    from infercache.kv import Pool

    with Pool.open(name) as pool:
        return pool.stats()


def test_create_put_status_persist_delete_restore_get(names, tmp_path: Path) -> None:
    name = names()
    result = run_cli("kv", "create", name, "--size", "32M", "--policy", "lru", "--block-size", "4K", check=True)
    assert name in result.stdout

    values = {f"key-{i}": make_value(f"key-{i}", 0, i, length_for(f"key-{i}", 1, 900_000)) for i in range(8)}
    values["empty-ish"] = b"x"
    for key, value in values.items():
        (tmp_path / f"{key}.in").write_bytes(value)
    _py(
        "import numpy as np\nfrom pathlib import Path\nfrom infercache.kv import Pool\n"
        f"p = Pool.open({name!r})\n"
        f"for key in {list(values)!r}:\n"
        f"    assert p.put(key, Path({str(tmp_path)!r}, key + '.in').read_bytes())\n"
        "assert p.put('array', np.arange(1000, dtype=np.float32).reshape(10, 100))\n"
        "p.close()\n"
    )

    status = _status(name)
    assert SPEC_STATUS_KEYS <= set(status)
    assert status["name"] == name and status["tier"] == "cpu" and status["policy"] == "lru"
    assert status["entries"] == len(values) + 1
    assert status["size_bytes"] == 32 << 20
    assert status["used_bytes"] >= sum(map(len, values.values())) + 4000
    assert 0 < status["utilization"] <= 1

    snapshot = tmp_path / "snap" / "pool.kvsnap"
    snapshot.parent.mkdir()
    run_cli("kv", "persist", name, "--path", str(snapshot), check=True)
    assert snapshot.is_file()
    assert [p.name for p in snapshot.parent.iterdir()] == ["pool.kvsnap"], "no temp file left behind"
    # only allocated data is written: far less than the 32 MiB pool
    assert snapshot.stat().st_size < status["used_bytes"] + (1 << 20)

    run_cli("kv", "delete", name, check=True)
    assert name not in [p["name"] for p in _json("kv", "list", "--format", "json")]
    gone = run_cli("kv", "status", name)
    assert gone.returncode != 0 and name in gone.stderr

    run_cli("kv", "restore", str(snapshot), check=True)
    listed = {p["name"]: p for p in _json("kv", "list", "--format", "json")}
    assert name in listed, "a restored pool is registered"
    restored = _status(name)
    assert restored["entries"] == len(values) + 1 and restored["policy"] == "lru"

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _py(
        "import numpy as np\nfrom pathlib import Path\nfrom infercache.kv import Pool\n"
        f"p = Pool.open({name!r})\n"
        f"for key in {list(values)!r}:\n"
        f"    Path({str(out_dir)!r}, key + '.bin').write_bytes(p.get(key))\n"
        "a = p.get_array('array', np.float32, (10, 100))\n"
        "assert (a == np.arange(1000, dtype=np.float32).reshape(10, 100)).all()\n"
        "p.close()\n"
    )
    for key, value in values.items():
        assert (out_dir / f"{key}.bin").read_bytes() == value, f"{key} differs after persist/restore"

    # restore under another name beside the original
    other = names()
    run_cli("kv", "restore", str(snapshot), "--name", other, check=True)
    assert _status(other)["entries"] == len(values) + 1
    assert {name, other} <= {p["name"] for p in _json("kv", "list", "--format", "json")}


def test_list_and_status_json_shapes(names) -> None:
    assert _json("kv", "list", "--format", "json") == []
    assert _json("kv", "status", "--format", "json") == []
    first, second = names(), names()
    run_cli("kv", "create", first, "--size", "8M", check=True)
    run_cli("kv", "create", second, "--size", "16M", "--policy", "s3fifo", check=True)
    _fill(first, 3, 10_000)

    pools = _json("kv", "list", "--format", "json")
    assert isinstance(pools, list) and {p["name"] for p in pools} == {first, second}
    by_name = {p["name"]: p for p in pools}
    for row in pools:
        assert {"name", "tier", "size_bytes", "used_bytes", "entries", "policy"} <= set(row)
    assert by_name[first]["entries"] == 3 and by_name[second]["entries"] == 0
    assert by_name[second]["policy"] == "s3fifo" and by_name[second]["size_bytes"] == 16 << 20

    every = _json("kv", "status", "--format", "json")
    assert isinstance(every, list) and {s["name"] for s in every} == {first, second}
    for stats in every:
        assert SPEC_STATUS_KEYS <= set(stats)

    table = run_cli("kv", "list", check=True).stdout
    assert first in table and second in table
    table = run_cli("kv", "status", first, check=True).stdout
    assert "used_bytes" in table and "lru" in table


def test_policies_json_and_table() -> None:
    policies = _json("kv", "policies", "--format", "json")
    assert isinstance(policies, list)
    by_name = {p["name"]: p["description"] for p in policies}
    assert {"lru", "lfu", "fifo", "priority", "ttl", "s3fifo"} <= set(by_name)
    assert all(isinstance(d, str) and d.strip() for d in by_name.values())
    table = run_cli("kv", "policies", check=True).stdout
    for name in by_name:
        assert name in table


def test_evict_percent_bytes_and_pins(names) -> None:
    name = names()
    run_cli("kv", "create", name, "--size", "8M", "--policy", "fifo", check=True)
    # 40 entries of 64 KiB = 2.5 MiB; k0 is pinned
    _fill(name, 40, 64 << 10, pin="k0")
    before = _stats(name)
    assert before["entries"] == 40

    result = run_cli("kv", "evict", name, "--bytes", "256K", check=True)
    after = _stats(name)
    freed = before["used_bytes"] - after["used_bytes"]
    assert freed >= 256 << 10, result.stdout
    assert after["entries"] < 40 and after["evictions"] >= before["evictions"] + 4
    present = _keys_present(name, [f"k{i}" for i in range(40)])
    assert "k0" in present, "pinned entries are never evicted"
    assert "k1" not in present and "k39" in present, "fifo evicts the oldest first"

    before = after
    run_cli("kv", "evict", name, "--percent", "10", check=True)
    after = _stats(name)
    assert before["used_bytes"] - after["used_bytes"] >= int(0.10 * before["used_bytes"])
    assert after["used_bytes"] > 0.8 * before["used_bytes"], "percent is of the bytes in use, not of the size"
    assert after["entries"] < before["entries"]

    run_cli("kv", "evict", name, "--percent", "100", check=True)
    after = _stats(name)
    assert _keys_present(name, ["k0", "k39"]) == {"k0"}, "percent 100 empties all but the pinned"
    assert after["entries"] == 1


def test_evict_expired_removes_only_expired(names) -> None:
    name = names()
    run_cli("kv", "create", name, "--size", "8M", "--policy", "ttl", check=True)
    _py(
        "from infercache.kv import Pool\n"
        f"p = Pool.open({name!r})\n"
        "for i in range(5):\n"
        "    assert p.put(f'short{i}', b'a' * 5000, ttl=0.05)\n"
        "    assert p.put(f'long{i}', b'b' * 5000, ttl=3600)\n"
        "    assert p.put(f'none{i}', b'c' * 5000)\n"
        "p.close()\n"
    )
    time.sleep(0.2)  # let the 50 ms TTLs pass (not a timing assertion)
    run_cli("kv", "evict", name, "--expired", check=True)
    assert _stats(name)["entries"] == 10
    keys = [f"{kind}{i}" for kind in ("short", "long", "none") for i in range(5)]
    present = _keys_present(name, keys)
    assert present == {k for k in keys if not k.startswith("short")}


def test_check_and_repair(names) -> None:
    name = names()
    run_cli("kv", "create", name, "--size", "8M", check=True)
    _fill(name, 10, 20_000)
    result = run_cli("kv", "check", name)
    assert result.returncode == 0, result.stderr
    assert "consistent" in result.stdout
    report = _json("kv", "check", name, "--format", "json")
    assert report["ok"] is True and report["problems"] == []
    _py(
        "from infercache.kv import Pool\n"
        f"p = Pool.open({name!r})\n"
        "from tests.kv.corrupt import corrupt_allocator\n"
        "corrupt_allocator(p)\n"
        "p.close()\n"
    )
    broken = run_cli("kv", "check", name, "--format", "json")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    report = json.loads(broken.stdout)
    assert report["ok"] is False and report["problems"]

    fixed = run_cli("kv", "check", name, "--repair", "--format", "json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    report = json.loads(fixed.stdout)
    assert report["ok"] is True and report["repaired"]
    assert run_cli("kv", "check", name).returncode == 0
    assert _status(name)["entries"] == 10, "repair keeps every entry of the table"


# ---------------------------------------------------------------- bad input


def _free_shm() -> int:
    st = os.statvfs("/dev/shm")
    return st.f_bavail * st.f_frsize


def _no_pools() -> None:
    from infercache.kv import Pool

    assert Pool.list_pools() == []


def test_size_larger_than_dev_shm_is_refused_with_numbers(names) -> None:
    name = names()
    too_big = _free_shm() + (1 << 40)
    result = run_cli("kv", "create", name, "--size", str(too_big))
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "/dev/shm" in message
    assert any(ch.isdigit() for ch in message)
    _no_pools()
    assert not any(name in p.name for p in Path("/dev/shm").iterdir()), "nothing created"


def test_disk_tier_size_larger_than_disk_is_refused(names, tmp_path: Path) -> None:
    name = names()
    st = os.statvfs(tmp_path)
    too_big = st.f_bavail * st.f_frsize + (1 << 40)
    backing = tmp_path / "pool.bin"
    result = run_cli("kv", "create", name, "--size", str(too_big), "--tier", "disk", "--path", str(backing))
    assert result.returncode == 2, result.stderr
    assert any(ch.isdigit() for ch in result.stderr)
    assert not backing.exists()
    _no_pools()


def test_disk_tier_pool_works(names, tmp_path: Path) -> None:
    name = names()
    backing = tmp_path / "pool.bin"
    run_cli("kv", "create", name, "--size", "8M", "--tier", "disk", "--path", str(backing), check=True)
    assert backing.is_file() and (backing.stat().st_mode & 0o777) == 0o600
    _fill(name, 4, 1000)
    status = _status(name)
    assert status["tier"] == "disk" and status["entries"] == 4 and Path(status["path"]) == backing


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--size", "12Q"], "12Q"),
        (["--size", "lots"], "lots"),
        (["--size", "0"], "size"),
        (["--size", "8M", "--policy", "random-walk"], "random-walk"),
        (["--size", "8M", "--tier", "tape"], "tape"),
        (["--size", "8M", "--block-size", "huge"], "huge"),
    ],
)
def test_create_bad_input_exits_2(names, args: list[str], needle: str) -> None:
    result = run_cli("kv", "create", names(), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in " ".join(result.stderr.split())
    _no_pools()


def test_create_name_used_exits_2(names) -> None:
    name = names()
    run_cli("kv", "create", name, "--size", "4M", check=True)
    _fill(name, 2, 100)
    result = run_cli("kv", "create", name, "--size", "8M")
    assert result.returncode == 2
    assert name in result.stderr
    status = _status(name)
    assert status["entries"] == 2 and status["size_bytes"] == 4 << 20, "the existing pool is untouched"


def test_gpu_tier_is_not_offered(names) -> None:
    """There is no gpu tier (nothing here or in CI could test one): refused like any unknown tier."""
    result = run_cli("kv", "create", names(), "--size", "8M", "--tier", "gpu")
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "gpu" in message and "cpu, disk" in message, message
    assert "gpu" not in run_cli("kv", "create", "--help", check=True).stdout.lower()
    _no_pools()


def test_evict_dry_run_plans_exact_bytes_then_evict_frees_them(names) -> None:
    name = names()
    run_cli("kv", "create", name, "--size", "8M", "--policy", "fifo", check=True)
    _fill(name, 10, 10_000)  # 3 blocks of 4 KiB each
    before = _stats(name)
    plan = _json("kv", "evict", name, "--bytes", "20K", "--dry-run", "--format", "json")
    assert plan["dry_run"] is True and plan["result"] is None
    assert [v["key"] for v in plan["victims"]] == ["k0", "k1"], "fifo: the two oldest cover 20 KiB"
    assert plan["bytes_freed"] == 2 * 3 * 4096 and all(v["size"] == 10_000 for v in plan["victims"])
    assert _stats(name)["used_bytes"] == before["used_bytes"], "a dry run changes nothing"
    text = run_cli("kv", "evict", name, "--bytes", "20K", "--dry-run", check=True).stdout
    assert "would evict 2 entries" in text and str(2 * 3 * 4096) in text
    done = _json("kv", "evict", name, "--bytes", "20K", "--format", "json")
    assert done["result"]["evicted"] == 2 and done["result"]["bytes_freed"] == plan["bytes_freed"]
    assert before["used_bytes"] - _stats(name)["used_bytes"] == plan["bytes_freed"]
    assert _keys_present(name, ["k0", "k1", "k2"]) == {"k2"}


def test_evict_needs_exactly_one_mode(names) -> None:
    name = names()
    run_cli("kv", "create", name, "--size", "4M", check=True)
    for args in ([], ["--percent", "10", "--expired"], ["--percent", "10", "--bytes", "1M"]):
        result = run_cli("kv", "evict", name, *args)
        assert result.returncode == 2, args
        assert "exactly one" in result.stderr
    for args in (["--percent", "0"], ["--percent", "150"], ["--bytes", "many"]):
        assert run_cli("kv", "evict", name, *args).returncode == 2, args


def test_unknown_pool_is_a_clear_error(names, tmp_path: Path) -> None:
    name = names()
    snap = tmp_path / "never-written.kvsnap"
    for args in (["status", name], ["evict", name, "--percent", "5"], ["check", name], ["delete", name],
                 ["persist", name, "--path", str(snap)]):  # fmt: skip
        result = run_cli("kv", *args)
        assert result.returncode in (1, 2), args
        assert name in result.stderr, args
    assert not snap.exists()


def test_corrupt_or_truncated_snapshot_is_refused(names, tmp_path: Path) -> None:
    name = names()
    run_cli("kv", "create", name, "--size", "8M", check=True)
    _fill(name, 6, 30_000)
    snapshot = tmp_path / "good.kvsnap"
    run_cli("kv", "persist", name, "--path", str(snapshot), check=True)
    data = snapshot.read_bytes()

    truncated = tmp_path / "truncated.kvsnap"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the data section
    corrupt = tmp_path / "corrupt.kvsnap"
    corrupt.write_bytes(bytes(flipped))
    garbage = tmp_path / "garbage.kvsnap"
    garbage.write_bytes(b"not a snapshot at all" * 100)

    for i, bad in enumerate((truncated, corrupt, garbage)):
        new_name = f"{name}-r{i}"
        result = run_cli("kv", "restore", str(bad), "--name", new_name)
        assert result.returncode in (1, 2), bad
        assert result.stderr.strip()
        assert new_name not in {p["name"] for p in _json("kv", "list", "--format", "json")}
        assert not any(new_name in p.name for p in Path("/dev/shm").iterdir()), "nothing created"
    missing = run_cli("kv", "restore", str(tmp_path / "nope.kvsnap"))
    assert missing.returncode == 2

    # the snapshot's own name is still taken: restoring it without --name is refused
    assert run_cli("kv", "restore", str(snapshot)).returncode == 2


def test_persist_to_unwritable_place_is_a_clean_error(names) -> None:
    """/proc refuses new files even for root: the OS error must be one line, exit 1, no traceback."""
    name = names()
    run_cli("kv", "create", name, "--size", "4M", check=True)
    result = run_cli("kv", "persist", name, "--path", "/proc/infercache-test.kvsnap")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "/proc/" in result.stderr


def test_list_shows_attached_processes_and_files_are_private(names, data_dir: Path) -> None:
    name = names()
    run_cli("kv", "create", name, "--size", "4M", check=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import sys\nfrom infercache.kv import Pool\np = Pool.open({name!r})\nprint('attached', flush=True)\n"
         "sys.stdin.read()\np.close()\n"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "attached"
        row = {p["name"]: p for p in _json("kv", "list", "--format", "json")}[name]
        assert holder.pid in row["attached"]
        assert holder.pid in _status(name)["attached"]
        assert str(holder.pid) in run_cli("kv", "status", name, check=True).stdout
    finally:
        holder.communicate("", timeout=60)
    row = {p["name"]: p for p in _json("kv", "list", "--format", "json")}[name]
    assert holder.pid not in row["attached"]
    assert Path(row["path"]).stat().st_mode & 0o777 == 0o600, "pool files are private to their owner"
    for path in data_dir.iterdir():
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


def test_root_cli_imports_no_pool_machinery() -> None:
    """`infercache --help` stays fast: the root loads the kv CLI (and with it the pool library and numpy)
    only when a `kv` command runs."""
    out = _py(
        "import sys, infercache.cli.app\n"
        "print(sorted(m for m in ('numpy', 'infercache.kv.pool', 'infercache.kv.allocator') if m in sys.modules))\n"
    ).stdout
    assert out.strip() == "[]"


def test_data_dir_flag_scopes_the_registry(names, tmp_path: Path) -> None:
    """`--data-dir` (before the sub-command) picks the registry, over INFERCACHE_DATA_DIR."""
    name = names()
    other = tmp_path / "other-data"
    run_cli("--data-dir", str(other), "kv", "create", name, "--size", "4M", check=True)
    try:
        listed = json.loads(run_cli("--data-dir", str(other), "kv", "list", "--format", "json", check=True).stdout)
        assert [p["name"] for p in listed] == [name]
        assert _json("kv", "list", "--format", "json") == [], "the env's data dir does not see it"
        assert (other / "kv-pools.json").is_file() or any(other.iterdir())
    finally:
        run_cli("--data-dir", str(other), "kv", "delete", name, check=True)
    assert json.loads(run_cli("--data-dir", str(other), "kv", "list", "--format", "json").stdout) == []
