import math

import torch

from lightning_hrp.engine.decompose import svd_of_product
from lightning_hrp.engine.init_rules import new_adapter_weights


def _svd(out=24, inp=16, R=8, top=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(out, R, generator=generator, dtype=torch.float64)
    A = torch.randn(R, inp, generator=generator, dtype=torch.float64)
    return B, A, svd_of_product(B, A, top=top, dtype=torch.float64)


def test_direction_unit_gives_orthonormal_rows_and_zero_B():
    _, _, svd = _svd()
    A, B = new_adapter_weights(svd, rule="direction", scale="unit", current_A=torch.randn(3, 16), preheat_scaling=1, scaling=1)
    torch.testing.assert_close(A @ A.T, torch.eye(3, dtype=torch.float64))
    assert B.shape == (24, 3) and torch.count_nonzero(B) == 0


def test_direction_match_init_norm_keeps_the_current_frobenius_norm_and_row_space():
    _, _, svd = _svd()
    current = torch.randn(3, 16, dtype=torch.float64) * 0.1
    A, _ = new_adapter_weights(svd, rule="direction", scale="match_init_norm", current_A=current, preheat_scaling=1, scaling=1)
    assert math.isclose(float(torch.linalg.matrix_norm(A)), float(torch.linalg.matrix_norm(current)), rel_tol=1e-12)
    rows = torch.linalg.qr(A.T).Q
    torch.testing.assert_close(rows @ rows.T, svd.Vh.T @ svd.Vh)


def test_keep_progress_reproduces_the_rank_r_truncation_of_the_scaled_update():
    B_p, A_p, svd = _svd(top=3)
    preheat_scaling, scaling = 0.5, 2.0
    A, B = new_adapter_weights(svd, rule="keep_progress", scale="unit", current_A=torch.zeros(3, 16), preheat_scaling=preheat_scaling, scaling=scaling)
    U, S, Vh = torch.linalg.svd(preheat_scaling * B_p @ A_p)
    truncation = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(scaling * B @ A, truncation)
    # The singular values are split evenly between the factors.
    torch.testing.assert_close(torch.linalg.norm(A, dim=1), torch.linalg.norm(B, dim=0))
    assert math.isclose(float(torch.linalg.norm(A[0])) ** 2, float(S[0]) / scaling, rel_tol=1e-9)
