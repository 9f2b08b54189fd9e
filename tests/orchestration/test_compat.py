"""orchestration.compat: Ray's private API used in one place, with a working fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import ray

from orchestration.compat import shutdown_own_ray

pytestmark = pytest.mark.slow  # real Ray


def _monitors(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """Ray autoscaler monitors among the descendants of ``parent`` (default: this process)."""
    parent = parent or psutil.Process()
    return [p for p in parent.children(recursive=True) if "monitor.py" in " ".join(p.cmdline())]


def test_a_local_ray_stops_with_its_monitor_killed_first():
    ray.init(num_cpus=1, include_dashboard=False)
    monitors = _monitors()
    assert monitors  # the autoscaler monitor this driver started
    shutdown_own_ray()
    assert not ray.is_initialized()
    gone, alive = psutil.wait_procs(monitors, timeout=10)
    assert not alive


def test_a_driver_that_joined_a_cluster_only_disconnects(tmp_path: Path):
    """The fallback: a joined driver started no processes, so nothing is killed and the
    cluster (its monitor included) keeps running."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = "6391"
    # --block: the head stays this child's, and stopping it stops the cluster it started
    # (not `ray stop`, which stops every Ray on the machine).
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={tmp_path}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        ray.init(address=f"127.0.0.1:{port}")
        assert not _monitors()  # none of this process's children
        cluster_monitors = _monitors(psutil.Process(head.pid))
        assert cluster_monitors
        shutdown_own_ray()
        assert not ray.is_initialized()
        assert all(p.is_running() for p in cluster_monitors)
        ray.init(address=f"127.0.0.1:{port}")  # the cluster is still up
        assert ray.cluster_resources()["CPU"] == 1
        ray.shutdown()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
