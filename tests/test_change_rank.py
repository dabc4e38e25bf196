"""Known answers for the change spectrum (mechdiff.rq1.change_rank)."""

import torch

from mechdiff.rq1.change_rank import change_spectrum


def _states(n=300, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), g


def test_identical_states_have_no_change():
    H, _ = _states()
    s = change_spectrum(H, H.clone())
    assert s.energy == () and s.rank_at(0.9) == 0 and s.relative_change == 0.0 and s.participation_ratio == 0.0


def test_planted_rank_one_change_reads_rank_one():
    H, g = _states()
    u = torch.randn(40, generator=g)
    coef = torch.randn(300, 1, generator=g)
    s = change_spectrum(H, H + coef * u)
    assert s.rank_at(0.99) == 1 and s.energy[0] > 1 - 1e-9
    assert abs(s.participation_ratio - 1.0) < 1e-6


def test_planted_rank_three_change_reads_three_directions():
    H, g = _states()
    U = torch.linalg.qr(torch.randn(40, 3, generator=g))[0]
    C = torch.randn(300, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0])
    s = change_spectrum(H, H + C @ U.T)
    assert s.rank_at(0.999) == 3 and sum(s.energy[3:]) < 1e-12
    assert 1.5 < s.participation_ratio < 3.0


def test_isotropic_change_needs_most_directions():
    H, g = _states()
    s = change_spectrum(H, H + 0.1 * torch.randn(300, 40, generator=g))
    assert s.rank_at(0.9) > 25 and abs(s.relative_change - 0.1) < 0.02


def test_wide_states_use_the_small_gram_matrix_and_agree():
    H, g = _states(n=20, d=64)
    u = torch.randn(64, generator=g)
    s = change_spectrum(H, H + torch.randn(20, 1, generator=g) * u)
    assert s.rank_at(0.99) == 1 and len(s.energy) == 20


def test_shape_mismatch_is_named():
    H, _ = _states()
    try:
        change_spectrum(H, H[:10])
    except ValueError as err:
        assert "paired states" in str(err)
    else:
        raise AssertionError("mismatched shapes were accepted")
