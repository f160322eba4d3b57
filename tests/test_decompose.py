import pytest
import torch

from lightning_hrp.engine.decompose import energy_kept, svd_of_product, svd_of_products


def _projector(rows: torch.Tensor) -> torch.Tensor:
    return rows.mT @ rows


def _dense_reference(B, A, top):
    U, S, Vh = torch.linalg.svd((B @ A).double(), full_matrices=False)
    return U[..., :top], S, Vh[..., :top, :]


SHAPES = [
    # (out, in, R, top)
    (40, 30, 8, 4),
    (30, 40, 8, 8),
    (16, 16, 16, 4),  # R == min(in, out)
    (12, 20, 32, 5),  # R > min(in, out)
    (64, 8, 16, 8),  # R > in
    (1, 7, 3, 1),
]


@pytest.mark.parametrize(("out", "inp", "R", "top"), SHAPES)
def test_matches_dense_svd(out, inp, R, top):
    generator = torch.Generator().manual_seed(out * 1000 + inp)
    B = torch.randn(out, R, generator=generator, dtype=torch.float64)
    A = torch.randn(R, inp, generator=generator, dtype=torch.float64)
    ours = svd_of_product(B, A, top=top, dtype=torch.float64)
    U, S, Vh = _dense_reference(B, A, top)
    k = min(out, inp, R)
    torch.testing.assert_close(ours.S, S[:k])
    # Subspaces agree up to sign: compare projectors, and the signed pairs reproduce the product.
    torch.testing.assert_close(_projector(ours.Vh), _projector(Vh), atol=1e-8, rtol=0)
    torch.testing.assert_close(_projector(ours.U.mT), _projector(U.mT), atol=1e-8, rtol=0)
    full = svd_of_product(B, A, dtype=torch.float64)
    torch.testing.assert_close(full.U @ torch.diag(full.S) @ full.Vh, B @ A)


def test_batched_over_leading_dimensions_in_float32():
    generator = torch.Generator().manual_seed(0)
    B = torch.randn(5, 48, 16, generator=generator)
    A = torch.randn(5, 16, 32, generator=generator)
    ours = svd_of_product(B, A, top=4)
    assert ours.U.dtype == torch.float32
    for i in range(5):
        _, S, Vh = _dense_reference(B[i], A[i], 4)
        torch.testing.assert_close(ours.S[i].double(), S[:16], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_projector(ours.Vh[i]).double(), _projector(Vh), atol=1e-4, rtol=0)


def test_rank_deficient_product_keeps_exact_singular_values():
    generator = torch.Generator().manual_seed(1)
    B = torch.randn(30, 8, generator=generator, dtype=torch.float64)
    B[:, 3:] = 0  # rank 3
    A = torch.randn(8, 20, generator=generator, dtype=torch.float64)
    ours = svd_of_product(B, A, top=5, dtype=torch.float64)
    _, S, Vh = _dense_reference(B, A, 3)
    torch.testing.assert_close(ours.S[:3], S[:3])
    assert torch.all(ours.S[3:].abs() < 1e-10)
    torch.testing.assert_close(_projector(ours.Vh[:3]), _projector(Vh), atol=1e-8, rtol=0)
    # The directions beyond the rank are still orthonormal rows.
    torch.testing.assert_close(ours.Vh @ ours.Vh.T, torch.eye(5, dtype=torch.float64), atol=1e-8, rtol=0)


def test_zero_product_gives_zero_spectrum_and_orthonormal_directions():
    A = torch.randn(8, 20, dtype=torch.float64)
    ours = svd_of_product(torch.zeros(30, 8, dtype=torch.float64), A, top=4, dtype=torch.float64)
    assert torch.count_nonzero(ours.S) == 0
    torch.testing.assert_close(ours.Vh @ ours.Vh.T, torch.eye(4, dtype=torch.float64))
    assert torch.isnan(torch.tensor(energy_kept(ours.S, 4)))


def test_sign_convention_makes_largest_entry_of_each_left_vector_positive():
    B, A = torch.randn(3, 25, 6), torch.randn(3, 6, 17)
    first = svd_of_product(B, A, top=3)
    flipped = svd_of_product(-B, -A, top=3)  # same product, different QR factors
    pivots = first.U.abs().argmax(dim=-2, keepdim=True)
    assert torch.all(torch.gather(first.U, -2, pivots) > 0)
    torch.testing.assert_close(first.U, flipped.U, atol=1e-5, rtol=0)
    torch.testing.assert_close(first.Vh, flipped.Vh, atol=1e-5, rtol=0)


def test_products_of_mixed_shapes_come_back_in_input_order():
    shapes = [(20, 10, 6), (12, 14, 6), (20, 10, 6), (9, 9, 12)]
    products = [(torch.randn(o, R, dtype=torch.float64), torch.randn(R, i, dtype=torch.float64)) for o, i, R in shapes]
    results = svd_of_products(products, tops=[2, 3, 2, 4], dtype=torch.float64)
    for (B, A), result, top in zip(products, results, [2, 3, 2, 4]):
        single = svd_of_product(B, A, top=top, dtype=torch.float64)
        torch.testing.assert_close(result.S, single.S)
        torch.testing.assert_close(result.Vh, single.Vh)


@pytest.mark.parametrize("bad", [{"top": 0}, {"top": 9}, {"dtype": torch.float16}])
def test_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        svd_of_product(torch.randn(10, 8), torch.randn(8, 12), **bad)


def test_energy_kept():
    assert energy_kept(torch.tensor([3.0, 4.0, 0.0]), 1) == pytest.approx(9 / 25)


def test_subspace_drift_is_zero_for_the_same_subspace_and_one_for_orthogonal():
    from lightning_hrp.engine.decompose import subspace_drift

    Q = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64)).Q.T
    rotation = torch.linalg.qr(torch.randn(2, 2, dtype=torch.float64)).Q
    assert subspace_drift(Q[:2], rotation @ Q[:2]) == pytest.approx(0, abs=1e-12)
    assert subspace_drift(Q[:2], Q[2:]) == pytest.approx(1)
