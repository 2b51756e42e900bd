"""Small helpers every part of the benchmark uses."""

import importlib.machinery
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("WALRELAY_CACHE", os.path.expanduser("~/.cache/walrelay"))
# scripts/free-ports, the one port picker of the shell scripts and this package.
_loader = importlib.machinery.SourceFileLoader("free_ports", os.path.join(ROOT, "scripts", "free-ports"))
_free_ports = importlib.util.module_from_spec(importlib.util.spec_from_loader("free_ports", _loader))
_loader.exec_module(_free_ports)


def log(message):
    print(message, file=sys.stderr, flush=True)


def free_port():
    """A free port below the ephemeral range, picked as scripts/free-ports does."""
    return _free_ports.free_ports(1)[0]


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
