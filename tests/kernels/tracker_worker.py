"""A separate process for test_tracking: compile a sample kernel N times with the tracker on.

Usage: python -m tests.kernels.tracker_worker CACHE_DIR N [START_FILE]
Env: TRACKER_ACTIVATION=install|env, TRACKER_FLUSH_S (flush interval), TRACKER_LINGER_S
(sleep after the compiles so background flushes happen), TRACKER_TARGET, TRACKER_FORK
(compile in a forked multiprocessing child).
"""

from __future__ import annotations

import logging
import os
import sys
import time


def main() -> None:
    cache, n = sys.argv[1], int(sys.argv[2])
    start_file = sys.argv[3] if len(sys.argv) > 3 else None
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from infercache.kernels import tracking

    tracking.FLUSH_INTERVAL_S = float(os.environ.get("TRACKER_FLUSH_S", "1"))
    if os.environ.get("TRACKER_ACTIVATION", "install") == "install":
        tracking.install()
    else:
        assert os.environ["TRITON_CACHE_MANAGER"] == tracking.MANAGER_PATH
    from infercache.testing.samples import compile_sample

    target = os.environ.get("TRACKER_TARGET", "cuda:90")
    compile_sample(cache, "row_sum_kernel", target)  # warm Triton up before the start line
    if start_file:
        while not os.path.exists(start_file):
            time.sleep(0.01)
    if os.environ.get("TRACKER_FORK"):
        # Like a forked vLLM worker: the loop runs in a multiprocessing child that leaves by os._exit.
        import multiprocessing

        child = multiprocessing.get_context("fork").Process(target=_loop, args=(cache, n, target))
        child.start()
        child.join()
        assert child.exitcode == 0
        return
    _loop(cache, n, target)


def _loop(cache: str, n: int, target: str) -> None:
    from infercache.testing.samples import compile_sample

    hits = 0
    for _ in range(n):
        hits += compile_sample(cache, "add_kernel", target).cache_hit
    time.sleep(float(os.environ.get("TRACKER_LINGER_S", "0")))
    print(f"hits={hits}", flush=True)


if __name__ == "__main__":
    main()
