"""Small helpers every part of the benchmark uses."""

import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("WALRELAY_CACHE", os.path.expanduser("~/.cache/walrelay"))


def log(message):
    print(message, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout, what, interval=0.05, alive=None):
    """Polls condition() until it is true; fails after timeout seconds, or
    at once when alive() says the process it waits on is gone."""
    deadline = time.time() + timeout
    while True:
        if condition():
            return
        if alive is not None and not alive():
            raise SystemExit(f"gave up waiting for {what}: the process exited")
        if time.time() > deadline:
            raise SystemExit(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(interval)


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]
