"""Packed sweeps end to end, in process: one grid run unpacked (one Ray trial per point) and
packed (``pack=True``, as ``--pack``: one Ray trial, ``modloss.train.fit_pack``), real Ray
Tune, real Fashion-MNIST, a real MLflow server. Each point must come out the same either
way: its row, its status, its child run (params, tags, metrics, artifacts) and its report
data; one point has an absurd learning rate and diverges alone."""

from __future__ import annotations

import io
import shutil

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from dashboards.data import load_sweep
from dashboards.report import build_report
from modloss.cli import app as modloss_app
from modloss.names import POINT_TAG, TRIAL_ARTIFACTS, curve
from orchestration.sweep import run_sweep

pytestmark = pytest.mark.slow

EPOCHS = 2
LAMS = [0.0, 0.5, 1.0]
# Packed and unpacked runs of a point do the same float32 arithmetic in a different order
# (one matmul of 3 x 16 members vs three of 16): the tolerance on the errors, which
# on 500 images is one image; measured here: equal.
TOLERANCE = 0.002


def _children(client: MlflowClient, parent_run_id: str, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )


@pytest.fixture(scope="module")
def sweeps(local_ray, mlflow_server, data_dir, tmp_path_factory):
    """The same space run unpacked and packed: {"unpacked"|"packed": (outcome, storage)}."""
    import yaml

    tmp = tmp_path_factory.mktemp("pack-sweep")
    space = tmp / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "pack-e2e",
                "dataset": "fashion-mnist",
                "models": ["16-M-64-H"],
                "lam": LAMS,
                "lr": {"16-M-64-H": {0.5: 1.0e12, "default": 0.096}},
                "epochs": EPOCHS,
                "subset": 500,
                "data_dir": str(data_dir),
            }
        )
    )
    out = {}
    for mode in ("unpacked", "packed"):
        storage = tmp / mode
        outcome = run_sweep(
            space,
            tracking_uri=mlflow_server,
            experiment=f"pack-e2e-{mode}",
            storage=storage,
            pack=mode == "packed",
            out=io.StringIO(),
        )
        out[mode] = (outcome, storage / f"pack-e2e-{mode}")
    return out


def test_packed_points_equal_their_unpacked_trials(sweeps):
    (unpacked, _), (packed, _) = sweeps["unpacked"], sweeps["packed"]
    assert unpacked.status == packed.status == "FINISHED"
    assert unpacked.table.trial_id.nunique() == 3 and packed.table.trial_id.nunique() == 1
    assert list(packed.table.point) == [0, 1, 2]
    for table in (unpacked.table, packed.table):
        assert dict(zip(table.lam, table.status, strict=True)) == {
            0.0: "finished",
            0.5: "diverged",
            1.0: "finished",
        }
    coords = ["model", "lam", "trial", "lr", "status", "best_epoch", "epochs_completed"]
    assert unpacked.table[coords].equals(packed.table[coords])
    for name in ("val_error", "test_error", "final_test_error"):
        diff = (unpacked.table[name] - packed.table[name]).abs().dropna()
        assert len(diff) == 2 and (diff <= TOLERANCE).all(), (name, diff)


def test_one_child_run_per_point_like_an_unpacked_trials(sweeps, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    runs = {}
    for mode, (outcome, _) in sweeps.items():
        children = _children(client, outcome.record.parent_run_id, f"pack-e2e-{mode}")
        assert len(children) == len(LAMS)  # one per point
        runs[mode] = {float(r.data.params["lam"]): r for r in children}
    packed, unpacked = runs["packed"], runs["unpacked"]
    assert {r.data.tags["trial_id"] for r in packed.values()} == set(
        sweeps["packed"][0].table.trial_id
    )
    assert sorted(r.data.tags[POINT_TAG] for r in packed.values()) == ["0", "1", "2"]
    for lam in LAMS:
        p, u = packed[lam], unpacked[lam]
        assert p.info.run_name == u.info.run_name == f"16-M-64-H_lam{lam:g}_t0"
        assert set(p.data.tags) == set(u.data.tags)
        assert p.data.params == u.data.params  # the same TrainConfig
        assert set(p.data.metrics) == set(u.data.metrics)
        for key in ("status", "model", "lam", "lr", "num_members"):
            assert p.data.tags[key] == u.data.tags[key]
        assert p.info.status == u.info.status == "FINISHED"
        artifacts = [{a.path for a in client.list_artifacts(r.info.run_id)} for r in (p, u)]
        assert artifacts[0] == artifacts[1]
        steps = [
            [m.step for m in client.get_metric_history(r.info.run_id, curve("val_error"))]
            for r in (p, u)
        ]
        assert steps[0] == steps[1]
    assert packed[0.5].data.tags["status"] == "diverged"
    assert set(TRIAL_ARTIFACTS) <= {a.path for a in client.list_artifacts(packed[1.0].info.run_id)}
    history = client.get_metric_history(packed[1.0].info.run_id, curve("val_error"))
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))


def test_report_reads_a_packed_sweep_as_an_unpacked_one(sweeps, mlflow_server, tmp_path):
    data = {mode: load_sweep(f"pack-e2e-{mode}", tracking_uri=mlflow_server) for mode in sweeps}
    columns = ["model", "lam", "trial", "status", "best_epoch", "num_members"]
    assert data["packed"].runs[columns].equals(data["unpacked"].runs[columns])
    assert not data["packed"].duplicates
    for name in ("curves", "robustness", "diversity", "losses"):
        assert len(getattr(data["packed"], name)) == len(getattr(data["unpacked"], name)) > 0
    report = build_report(data["packed"], tmp_path / "report")
    assert report.html.is_file()
    assert report.empty == build_report(data["unpacked"], tmp_path / "unpacked").empty


def test_analyze_works_on_a_packed_points_folder(sweeps, tmp_path):
    _, exp_dir = sweeps["packed"]
    (checkpoint,) = exp_dir.glob("*pack3*/checkpoint_*")
    point = tmp_path / "point2"
    shutil.copytree(checkpoint / "point2", point)  # the storage's files stay untouched
    result = CliRunner().invoke(modloss_app, ["analyze", "robustness", str(point)])
    assert result.exit_code == 0, result.output
    assert (point / "robustness.png").is_file()
