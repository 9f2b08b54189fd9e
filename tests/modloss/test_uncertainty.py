"""Uncertainty at the selected epoch against slow references, scikit-learn and torchmetrics:
temperature scaling, the rotation shift, OOD scores and rates, MNIST files, reliability."""

import dataclasses
import gzip
import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from torchmetrics.classification import MulticlassCalibrationError

from modloss.data import DATASETS, ChecksumError, FileSpec, load_raw, load_splits, rotate
from modloss.metrics import ECE_BINS, evaluate
from modloss.models import create_model
from modloss.names import OOD_CSV, SELECTED_EPOCH_FILE, SHIFT_CSV
from modloss.pack import pack_models
from modloss.uncertainty import (
    OOD_FALLBACK,
    auroc,
    ece,
    fpr_at_tpr,
    ood_images,
    ood_report,
    ood_scores,
    plot_reliability,
    reliability_bins,
    selected_epoch,
    selected_epochs,
    shift_curve,
    temperature_scale,
)

M, K = 4, 10


def _overconfident(n: int, seed: int, temperature: float = 2.5):
    """Member logits whose ensemble is overconfident by ``temperature``: labels are drawn
    from ``softmax(eta_bar / temperature)``."""
    g = torch.Generator().manual_seed(seed)
    base = 3 * torch.randn(n, K, generator=g, dtype=torch.float64)
    eta = base + 0.5 * torch.randn(M, n, K, generator=g, dtype=torch.float64)
    target = torch.multinomial((eta.mean(0) / temperature).softmax(-1), 1, generator=g)
    return eta.float(), target.view(-1)


# --------------------------------------------------------------------------- temperature


def test_temperature_minimises_validation_nll_and_recovers_the_true_one() -> None:
    val_eta, val_y = _overconfident(20_000, 0)
    test_eta, test_y = _overconfident(5_000, 1)
    fit = temperature_scale(val_eta, val_y, test_eta, test_y)
    # Slow reference: the validation NLL on a grid of temperatures, then a finer one.
    val_bar = val_eta.double().mean(0)

    def best(grid: torch.Tensor) -> float:
        nll = torch.stack([F.cross_entropy(val_bar / t, val_y) for t in grid])
        return grid[nll.argmin()].item()

    coarse = best(torch.linspace(1.0, 4.0, 61, dtype=torch.float64))  # steps of 0.05
    fine = best(torch.linspace(coarse - 0.05, coarse + 0.05, 101, dtype=torch.float64))
    assert fit.temperature == pytest.approx(fine, abs=2e-3)
    assert fit.temperature == pytest.approx(2.5, rel=0.05)  # labels were drawn at T = 2.5
    test_bar = test_eta.double().mean(0)
    assert fit.nll_before == pytest.approx(F.cross_entropy(test_bar, test_y).item())
    assert fit.nll_after == pytest.approx(
        F.cross_entropy(test_bar / fit.temperature, test_y).item()
    )
    assert fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before
    metric = MulticlassCalibrationError(num_classes=K, n_bins=ECE_BINS, norm="l1")
    expected = metric((test_bar / fit.temperature).softmax(-1).float(), test_y).item()
    assert fit.ece_after == pytest.approx(expected, abs=1e-6)


def test_temperature_of_a_calibrated_ensemble_is_one() -> None:
    val_eta, val_y = _overconfident(20_000, 2, temperature=1.0)
    fit = temperature_scale(val_eta, val_y, *_overconfident(100, 3, temperature=1.0))
    assert fit.temperature == pytest.approx(1.0, abs=0.05)


def test_temperature_rejects_bad_logits() -> None:
    eta, y = _overconfident(10, 4)
    with pytest.raises(ValueError, match="val_eta must be floating-point logits"):
        temperature_scale(eta[0], y, eta, y)
    with pytest.raises(ValueError, match="target for test_eta"):
        temperature_scale(eta, y, eta, y[:5])


# --------------------------------------------------------------------------- shift


@pytest.fixture(scope="module")
def fmnist_small(data_dir: Path):
    return load_splits("fashion-mnist", data_dir=data_dir, subset=300)


def test_rotation_turns_counter_clockwise_and_fills_with_standardised_black(
    fmnist_small,
) -> None:
    x = fmnist_small.test.x[:8]
    for k in (1, 2, 3):
        torch.testing.assert_close(rotate(x, 90 * k), torch.rot90(x, k, (2, 3)), atol=1e-5, rtol=0)
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 0, 4] = 1.0  # top right
    assert rotate(image, 90)[0, 0, 0, 0] == pytest.approx(1.0, abs=1e-5)  # now top left
    black = -fmnist_small.x_mean / fmnist_small.x_std
    corner = rotate(x, 45, fill=black)[:, 0, 0, 0]
    torch.testing.assert_close(corner, black.expand(len(x)))
    with pytest.raises(ValueError, match="square images"):
        rotate(torch.zeros(1, 1, 4, 5), 10)


def test_shift_curve_rows_are_the_metrics_of_the_rotated_test_set(fmnist_small) -> None:
    torch.manual_seed(0)
    model = create_model("16-M-64-H", seed=0)
    x, y = fmnist_small.test
    black = -fmnist_small.x_mean / fmnist_small.x_std
    curve = shift_curve(model, x, y, fill=black, angles=(0, 90, 180), batch_size=128)
    assert curve["angle"].tolist() == [0, 90, 180]
    for angle, shifted in ((0, x), (90, torch.rot90(x, 1, (2, 3))), (180, x.flip(2, 3))):
        m, _ = evaluate(model, shifted, y, family="categorical", lam=1.0)
        row = curve.set_index("angle").loc[angle]
        assert row["accuracy"] == pytest.approx(1 - m["error"], abs=1 / len(y))
        assert row["nll"] == pytest.approx(m["ensemble_nll"], rel=1e-4)
        assert row["member_ece"] == pytest.approx(m["member_ece"], abs=1e-4)
        assert row["member_accuracy"] == pytest.approx(1 - m["member_error_mean"], abs=1e-3)


# --------------------------------------------------------------------------- OOD


def test_auroc_and_fpr95_match_scikit_learn_with_ties() -> None:
    g = torch.Generator().manual_seed(5)
    scores_in = torch.randint(0, 20, (300,), generator=g).double()
    scores_out = torch.randint(5, 30, (200,), generator=g).double()
    labels = np.r_[np.zeros(300), np.ones(200)]
    everything = torch.cat([scores_in, scores_out]).numpy()
    assert auroc(scores_in, scores_out) == pytest.approx(roc_auc_score(labels, everything))
    fpr, tpr, _ = roc_curve(labels, everything, drop_intermediate=False)
    assert fpr_at_tpr(scores_in, scores_out) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    continuous = torch.randn(200, generator=g, dtype=torch.float64)
    shifted = torch.randn(150, generator=g, dtype=torch.float64) + 1
    labels = np.r_[np.zeros(200), np.ones(150)]
    both = torch.cat([continuous, shifted]).numpy()
    fpr, tpr, _ = roc_curve(labels, both, drop_intermediate=False)
    assert fpr_at_tpr(continuous, shifted) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    assert auroc(continuous, shifted) == pytest.approx(roc_auc_score(labels, both))


def test_ood_scores_match_per_example_loops() -> None:
    eta, _ = _overconfident(50, 6)
    scores = ood_scores(eta)
    for i in range(50):
        ensemble = eta[:, i].double().mean(0).softmax(-1)
        members = [eta[j, i].double().softmax(-1) for j in range(M)]
        mean = sum(members) / M

        def h(p: torch.Tensor) -> float:
            return -sum(v * math.log(v) for v in p.tolist() if v > 0)

        assert scores["msp"][i].item() == pytest.approx(-ensemble.max().item())
        assert scores["entropy"][i].item() == pytest.approx(h(ensemble))
        expected = h(mean) - sum(h(p) for p in members) / M
        assert scores["mutual_information"][i].item() == pytest.approx(expected, abs=1e-9)
    agreeing = ood_scores(eta[:1].expand(M, -1, -1))["mutual_information"]
    assert agreeing.abs().max() < 1e-9


def _idx_gz(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


@pytest.fixture
def fake_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, dict]:
    """Small MNIST files in the real IDX format, registered as its published files."""
    rng = np.random.default_rng(7)
    arrays = {}
    blobs = {}
    for split, n in (("train", 6), ("t10k", 4)):
        arrays[split] = rng.integers(0, 256, (n, 28, 28))
        blobs[f"{split}-images-idx3-ubyte.gz"] = _idx_gz(2051, arrays[split])
        blobs[f"{split}-labels-idx1-ubyte.gz"] = _idx_gz(2049, np.arange(n) % 10)
    specs = tuple(FileSpec(n, hashlib.md5(b).hexdigest(), len(b)) for n, b in blobs.items())
    small = dataclasses.replace(DATASETS["mnist"], files=specs, num_train=6, num_test=4)
    monkeypatch.setitem(DATASETS, "mnist", small)
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    return tmp_path, arrays


def test_mnist_idx_files_are_read_and_md5_checked(fake_mnist) -> None:
    root, arrays = fake_mnist
    raw = load_raw("mnist", data_dir=root, download=False)
    assert raw.x_test.shape == (4, 1, 28, 28) and raw.x_test.dtype == torch.uint8
    assert torch.equal(raw.x_train[:, 0], torch.from_numpy(arrays["train"]).to(torch.uint8))
    assert raw.y_test.tolist() == [0, 1, 2, 3]
    (root / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx_gz(2049, np.zeros(4)))
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        load_raw("mnist", data_dir=root, download=False)


def test_ood_images_are_mnist_when_present_else_the_upscaled_digits(
    fake_mnist, fmnist_small
) -> None:
    root, arrays = fake_mnist
    mean, std = fmnist_small.x_mean.view(1, -1, 1, 1), fmnist_small.x_std.view(1, -1, 1, 1)
    x, name = ood_images(fmnist_small, data_dir=root)
    assert name == "mnist"
    expected = torch.from_numpy(arrays["t10k"]).float().unsqueeze(1) / 255
    torch.testing.assert_close(x * std + mean, expected)
    x, name = ood_images(fmnist_small, data_dir=root / "empty")
    assert name == OOD_FALLBACK and x.shape == (1797, 1, 28, 28)
    raw = x * std + mean  # back to [0, 1] intensities: digits' 0..16 scaled
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6 and raw.max() > 0.9


def test_ood_report_scores_the_test_set_against_the_ood_set(fake_mnist, fmnist_small) -> None:
    root, _ = fake_mnist
    model = create_model("16-M-64-H", seed=0)
    report = ood_report(model, fmnist_small, data_dir=root / "empty", batch_size=100)
    assert report["score"].tolist() == ["msp", "entropy", "mutual_information"]
    assert set(report["ood_dataset"]) == {OOD_FALLBACK}
    x_out, _ = ood_images(fmnist_small, data_dir=root / "empty")
    with torch.no_grad():
        scores_in = ood_scores(model.eval()(fmnist_small.test.x))
        scores_out = ood_scores(model(x_out))
    row = report.set_index("score").loc["entropy"]
    assert row["auroc"] == pytest.approx(auroc(scores_in["entropy"], scores_out["entropy"]))
    assert row["fpr95"] == pytest.approx(fpr_at_tpr(scores_in["entropy"], scores_out["entropy"]))


# --------------------------------------------------------------------------- reliability


def test_reliability_bins_match_a_loop_and_give_torchmetrics_ece(tmp_path: Path) -> None:
    eta, y = _overconfident(2_000, 8)
    table = reliability_bins(eta, y)
    probs = eta.double().mean(0).softmax(-1)
    conf, pred = probs.max(-1)
    assert table["count"].sum() == len(y)
    for b, row in table.iterrows():
        inside = [i for i in range(len(y)) if b / ECE_BINS <= conf[i] < (b + 1) / ECE_BINS]
        assert row["count"] == len(inside)
        if inside:
            accuracy = sum(int(pred[i] == y[i]) for i in inside) / len(inside)
            assert row["accuracy"] == pytest.approx(accuracy)
    from_table = (table["count"] * (table["accuracy"] - table["confidence"]).abs()).sum()
    metric = MulticlassCalibrationError(num_classes=K, n_bins=ECE_BINS, norm="l1")
    reference = metric(probs.float(), y).item()
    assert from_table / len(y) == pytest.approx(reference, abs=1e-6)
    assert ece(probs.float(), y) == pytest.approx(reference, abs=1e-6)
    path = plot_reliability(eta, y, tmp_path / "reliability.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- one run, a pack


def test_selected_epochs_of_a_pack_are_each_runs_own_analyses(fmnist_small, tmp_path) -> None:
    """The analyses of a pack's runs, from one pass of the packed model over each rotated
    test set and the OOD images, are the files selected_epoch writes for each run alone."""
    models = [create_model("16-M-64-H", seed=seed).eval() for seed in (0, 1, 2)]
    vals = [
        evaluate(m, *fmnist_small.val, family="categorical", lam=1.0, keep_eta=True)[1]
        for m in models
    ]
    tests = [
        evaluate(m, *fmnist_small.test, family="categorical", lam=1.0, keep_eta=True)[1]
        for m in models
    ]
    val_pairs = [(eta, fmnist_small.val.y) for eta in vals]
    test_pairs = [(eta, fmnist_small.test.y) for eta in tests]
    packed = [tmp_path / f"packed{g}" for g in range(3)]
    alone = [tmp_path / f"alone{g}" for g in range(3)]
    for folder in packed + alone:
        folder.mkdir()
    results = selected_epochs(
        pack_models(models), fmnist_small, val_pairs, test_pairs, packed, epochs=[3, 4, 5]
    )
    for g, model in enumerate(models):
        own = selected_epoch(
            model, fmnist_small, val_pairs[g], test_pairs[g], alone[g], epoch=3 + g
        )
        assert results[g] == pytest.approx(own, rel=1e-5, abs=1e-7)
        for name in (SHIFT_CSV, OOD_CSV):
            pd.testing.assert_frame_equal(
                pd.read_csv(packed[g] / name), pd.read_csv(alone[g] / name), rtol=1e-5
            )
        record = json.loads((packed[g] / SELECTED_EPOCH_FILE).read_text())
        assert record["epoch"] == 3 + g
    # The runs differ, so a group read from the wrong members would not match its own.
    assert results[0]["rotated90_accuracy"] != results[1]["rotated90_accuracy"]
