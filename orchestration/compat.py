"""The one place where orchestration reaches into Ray's private API, each use with a
public fallback that a test exercises."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["shutdown_own_ray", "start_local_ray"]


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


def start_local_ray(**kwargs: Any) -> None:
    """``ray.init`` of a local, single-node Ray whose every socket (GCS, raylet, agents,
    workers, driver) binds 127.0.0.1.

    Ray takes its node IP from
    ``ray._private.services.get_node_ip_address``, which answers 127.0.0.1 only when
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off (read once, at import, into
    ``ray._private.ray_constants``); every process of the node then binds that IP. Passing
    ``_node_ip_address="127.0.0.1"`` does not work: Ray replaces a loopback address by the
    machine's. Only for a cluster this process starts; the setting is restored afterwards.
    """
    import ray
    import ray._private.ray_constants as ray_constants

    env, key = os.environ, ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_const = env.get(key), ray_constants.ENABLE_RAY_CLUSTER
    env[key], ray_constants.ENABLE_RAY_CLUSTER = "0", False  # child processes read the env
    try:
        ray.init(**kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            env.pop(key, None)
        else:
            env[key] = saved_env
