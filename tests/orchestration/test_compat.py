"""orchestration.compat: Ray's private API used in one place, with a working fallback."""

from __future__ import annotations

import types

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


def test_without_rays_private_api_it_is_a_plain_shutdown(monkeypatch: pytest.MonkeyPatch):
    """The fallback, as with a Ray whose private layout differs: ``ray._private.worker``
    without ``_global_node``. Ray still stops, its monitor ended by ray.shutdown's SIGTERM."""
    ray.init(num_cpus=1, include_dashboard=False)
    monitors = _monitors()
    assert monitors
    # ray.shutdown reads its own module's globals, not this attribute: only the lookup breaks.
    monkeypatch.setattr(ray._private, "worker", types.SimpleNamespace())
    shutdown_own_ray()
    monkeypatch.undo()
    assert not ray.is_initialized()
    gone, alive = psutil.wait_procs(monitors, timeout=30)
    assert not alive
