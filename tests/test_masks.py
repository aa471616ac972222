"""Sparsity specs and mask helpers: exact counts, N:M validity, parsing good and bad inputs."""

import pytest
import torch

from prunetune.errors import PrunetuneError
from prunetune.pruning.masks import (SparsitySpec, is_nm_valid, num_pruned, parse_sparsity, prune_mask_matrix,
                                   prune_mask_nm, prune_mask_rows, sparsity_of)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.95])
def test_prune_mask_rows_exact_and_lowest(sparsity):
    torch.manual_seed(0)
    s = torch.randn(13, 40)
    mask = prune_mask_rows(s, sparsity)
    k = round(sparsity * 40)
    assert mask.dtype == torch.bool and mask.shape == s.shape
    assert (mask.sum(1) == k).all()
    if 0 < k < 40:
        # every pruned score is below every kept score of the same row
        assert (s.masked_fill(~mask, -float("inf")).max(1).values < s.masked_fill(mask, float("inf")).min(1).values).all()
        assert torch.equal(mask, s <= s.sort(1).values[:, k - 1:k])


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_prune_mask_matrix_exact_and_lowest(sparsity):
    torch.manual_seed(1)
    s = torch.randn(9, 31)
    mask = prune_mask_matrix(s, sparsity)
    k = round(sparsity * s.numel())
    assert int(mask.sum()) == k
    if k:
        assert s[mask].max() < s[~mask].min()
    assert mask.sum(1).unique().numel() > 1 or k == 0  # matrix scope: rows are not forced equal


def test_num_pruned_rounds_halves_up():
    assert num_pruned(10, 0.25) == 3 and num_pruned(10, 0.5) == 5 and num_pruned(7, 0.5) == 4
    assert num_pruned(64, 0.7) == 45 and num_pruned(5, 0.0) == 0


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_prune_mask_nm_groups(n, m):
    torch.manual_seed(2)
    s = torch.randn(7, 8 * m)
    mask = prune_mask_nm(s, n, m)
    g_mask = mask.view(7, 8, m)
    g_s = s.view(7, 8, m)
    assert (g_mask.sum(-1) == m - n).all()
    # the pruned entries are the m-n lowest of each group
    lowest = g_s.sort(-1).values[..., m - n - 1:m - n]
    assert torch.equal(g_mask, g_s <= lowest)
    W = torch.randn(7, 8 * m).masked_fill(mask, 0.0)
    assert is_nm_valid(W, n, m)


def test_is_nm_valid_detects_violations():
    W = torch.ones(2, 8)
    W[:, [0, 1, 4, 5]] = 0
    assert is_nm_valid(W, 2, 4)
    assert is_nm_valid(W, 3, 4)          # more zeros than needed is fine
    W[1, 4] = 3.0
    assert not is_nm_valid(W, 2, 4)      # second group of row 1 has only one zero
    assert not is_nm_valid(torch.zeros(2, 6), 2, 4)  # 4 does not divide 6
    assert not is_nm_valid(torch.ones(3, 8), 2, 4)


def test_sparsity_of():
    W = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert sparsity_of(W) == 0.75
    assert sparsity_of(torch.ones(3, 3)) == 0.0


@pytest.mark.parametrize("value,kind,sparsity,n,m,text", [
    (0.5, "unstructured", 0.5, 0, 0, "0.5"),
    ("0.5", "unstructured", 0.5, 0, 0, "0.5"),
    ("50%", "unstructured", 0.5, 0, 0, "0.5"),
    (" 0.7 ", "unstructured", 0.7, 0, 0, "0.7"),
    (0, "unstructured", 0.0, 0, 0, "0.0"),
    ("2:4", "nm", 0.5, 2, 4, "2:4"),
    ("4:8", "nm", 0.5, 4, 8, "4:8"),
    ("1:4", "nm", 0.75, 1, 4, "1:4"),
])
def test_parse_sparsity_good(value, kind, sparsity, n, m, text):
    spec = parse_sparsity(value)
    assert isinstance(spec, SparsitySpec)
    assert (spec.kind, spec.n, spec.m) == (kind, n, m) and spec.sparsity == pytest.approx(sparsity)
    assert str(spec) == text
    assert parse_sparsity(str(spec)) == spec


@pytest.mark.parametrize("bad,needle", [
    ("3:2", "0 < N < M"), ("2:0", "0 < N < M"), ("0:4", "0 < N < M"), ("4:4", "0 < N < M"),
    ("a:b", "two integers"), ("2:4:8", "two integers"),
    (1.0, "[0, 1)"), (-0.1, "[0, 1)"), ("1.5", "[0, 1)"), ("100%", "[0, 1)"), ("nan", "[0, 1)"),
    ("abc", "expected"), ("", "expected"), (True, "expected"),
])
def test_parse_sparsity_bad(bad, needle):
    with pytest.raises(PrunetuneError) as ei:
        parse_sparsity(bad)
    msg = str(ei.value)
    assert f"'{str(bad).strip()}'" in msg
    assert needle in msg
    assert "\n" not in msg


def test_nm_message_explains_n():
    with pytest.raises(PrunetuneError, match=r"invalid sparsity '3:2': N:M needs 0 < N < M \(N = weights kept"):
        parse_sparsity("3:2")


def test_check_fits_names_layer():
    spec = parse_sparsity("2:4")
    spec.check_fits(64, "model.layers.0.mlp.down_proj")  # fits: no error
    with pytest.raises(PrunetuneError) as ei:
        parse_sparsity("4:8").check_fits(100, "model.layers.3.self_attn.q_proj")
    assert "model.layers.3.self_attn.q_proj" in str(ei.value) and "100" in str(ei.value)
    parse_sparsity("0.5").check_fits(101, "anything")  # unstructured always fits
