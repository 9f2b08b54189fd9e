"""The per-trial CSV tables the tracker derives from saved logits, read the way the report
reads them."""

from __future__ import annotations

import torch

from orchestration.tracking import analysis_tables

M, N, K = 6, 300, 4


def _save(directory, split: str, eta: torch.Tensor, target: torch.Tensor) -> None:
    # The format modloss.train.fit writes at the best-validation epoch.
    logits = {"eta": eta, "target": target, "epoch": 3, "split": split, "family": "categorical"}
    torch.save(logits, directory / f"{split}_logits.pt")


def test_tables_summarise_the_saved_logits(tmp_path):
    g = torch.Generator().manual_seed(0)
    target = torch.randint(K, (N,), generator=g)
    eta = torch.randn(M, N, K, generator=g)
    eta[0] += 6 * torch.nn.functional.one_hot(target, K)  # member 0 is nearly always right
    _save(tmp_path, "test", eta, target)
    _save(tmp_path, "val", torch.randn(M, N, K, generator=g), target)

    tables = analysis_tables(tmp_path)
    assert set(tables) == {"member_entropy.csv", "confusion.csv", "specialists.csv"}

    entropy = tables["member_entropy.csv"]
    probs = eta.softmax(-1)
    expected = -(probs * probs.log()).sum(-1).mean(1)
    torch.testing.assert_close(torch.tensor(entropy["entropy"].to_numpy()), expected.double())

    confusion = tables["confusion.csv"]
    assert (confusion["count"] > 0).all()  # non-zero cells only
    assert confusion.groupby("member")["count"].sum().tolist() == [N] * M
    member0 = confusion[confusion["member"] == 0]
    correct = member0.loc[member0["true"] == member0["predicted"], "count"].sum()
    assert correct == (eta[0].argmax(-1) == target).sum().item() > 0.95 * N

    spec = tables["specialists.csv"]
    assert list(spec["class"]) == list(range(K))
    assert set(spec["subset_size"]) == {M // 2}
    assert {"random_member", "specialist_member", "random_subset", "specialist_subset"} <= set(
        spec.columns
    )


def test_one_member_has_no_specialists_and_missing_logits_give_nothing(tmp_path):
    assert analysis_tables(tmp_path) == {}
    target = torch.arange(N) % K
    eta = torch.randn(1, N, K)
    _save(tmp_path, "test", eta, target)
    _save(tmp_path, "val", eta, target)
    assert set(analysis_tables(tmp_path)) == {"member_entropy.csv", "confusion.csv"}
