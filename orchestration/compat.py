"""The one place where orchestration reaches into Ray's private API, each use with a
public fallback that a test exercises."""

from __future__ import annotations

__all__ = ["shutdown_own_ray"]


def shutdown_own_ray() -> None:
    """``ray.shutdown()``, a second sooner when it stops a local Ray started by this process.

    Ray stops its processes one after the other and gives each up to a second after SIGTERM;
    the autoscaler monitor of a local Ray (nothing to scale) always uses that second, so it
    is killed outright first. Which processes Ray started is private to Ray
    (``ray._private.worker._global_node.all_processes``): where that is missing, as on a
    driver that joined a cluster or in another Ray version, this is a plain
    ``ray.shutdown()``.
    """
    import ray

    private = getattr(ray, "_private", None)
    node = getattr(getattr(private, "worker", None), "_global_node", None)
    for info in getattr(node, "all_processes", {}).get("monitor", []):
        info.process.kill()
    ray.shutdown()
