"""Small search spaces for the orchestration tests derived from the smoke space (real Fashion-MNIST
through the shared ``data_dir`` fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
SPACES = ROOT / "search_spaces"


@pytest.fixture
def make_space(tmp_path: Path, data_dir: Path):
    """``make_space(base="fmnist_smoke.yaml", **changes)``: a copy of a shipped space with
    top-level keys replaced, reading the real Fashion-MNIST of ``data_dir``."""
    count = 0

    def make(base: str = "fmnist_smoke.yaml", **changes) -> Path:
        nonlocal count
        count += 1
        space = yaml.safe_load((SPACES / base).read_text())
        space.update({"data_dir": str(data_dir), **changes})
        path = tmp_path / f"space{count}.yaml"
        path.write_text(yaml.safe_dump(space, sort_keys=False))
        return path

    return make


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for the module's in-process sweeps."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
