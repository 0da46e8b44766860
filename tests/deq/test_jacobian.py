import torch

from deq_lightning.deq import jac_loss_estimate, residual_loss, spectral_radius

from .problems import TanhCell


def exact_jacobians(cell, z, x):
    def one(b):
        return torch.autograd.functional.jacobian(lambda zz: cell(zz[None], x[b : b + 1])[0], z[b])

    return torch.stack([one(b) for b in range(z.shape[0])])


def test_hutchinson_matches_exact_frobenius_within_error():
    cell = TanhCell(d=12, norm=0.9)
    x = torch.randn(3, 12, dtype=torch.float64)
    z = torch.randn(3, 12, dtype=torch.float64).requires_grad_()
    fz = cell(z, x)
    jac = exact_jacobians(cell, z.detach(), x)
    exact = (jac.pow(2).sum((1, 2)) / 12).mean()
    draws = torch.stack([jac_loss_estimate(fz, z, create_graph=False) for _ in range(2000)])
    stderr = draws.std() / len(draws) ** 0.5
    assert abs(draws.mean() - exact) < 4 * stderr
    assert draws.std() > 0  # it is an estimate, not the exact value


def test_hutchinson_is_differentiable():
    cell = TanhCell(d=8)
    x = torch.randn(2, 8, dtype=torch.float64)
    z = torch.randn(2, 8, dtype=torch.float64).requires_grad_()
    loss = jac_loss_estimate(cell(z, x), z, samples=2)
    (gw,) = torch.autograd.grad(loss, cell.w)
    assert gw.abs().sum() > 0


def test_power_method_finds_spectral_radius():
    # A symmetric linear map with known eigenvalues, a different radius per sample.
    d = 10
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    radii = torch.tensor([0.5, 0.9], dtype=torch.float64)
    mats = torch.stack(
        [(q * torch.linspace(-0.1, r.item(), d, dtype=torch.float64)) @ q.T for r in radii]
    )
    z = torch.randn(2, d, dtype=torch.float64).requires_grad_()
    fz = torch.einsum("bij,bj->bi", mats, z)
    est = spectral_radius(fz, z, n_iter=300)
    torch.testing.assert_close(est, radii, rtol=1e-4, atol=1e-6)


def test_residual_loss_is_the_relative_residual_and_trains_f_only():
    cell = TanhCell(d=8)
    x = torch.randn(3, 8, dtype=torch.float64)
    z = torch.randn(3, 8, dtype=torch.float64).requires_grad_()
    fz = cell(z, x)
    loss = residual_loss(fz, z)
    torch.testing.assert_close(loss, ((fz - z).norm(dim=1) / fz.norm(dim=1)).mean())
    gw, gz = torch.autograd.grad(loss, [cell.w, z])
    assert gw.abs().sum() > 0
    # z is held fixed in the difference: its gradient is only the one through f(z)
    fz = cell(z, x)
    (gz_through_f,) = torch.autograd.grad(
        ((fz - z.detach()).norm(dim=1) / fz.norm(dim=1)).mean(), z
    )
    torch.testing.assert_close(gz, gz_through_f)


def test_residual_loss_of_a_tuple_state_pools_its_parts():
    a, b = torch.randn(2, 3), torch.randn(2, 4, 2)
    fa, fb = a + 1.0, b.clone()
    flat = torch.cat([a.flatten(1), b.flatten(1)], 1)
    fflat = torch.cat([fa.flatten(1), fb.flatten(1)], 1)
    expected = ((fflat - flat).norm(dim=1) / fflat.norm(dim=1)).mean()
    torch.testing.assert_close(residual_loss((fa, fb), (a, b)), expected)
    assert residual_loss((a, b), (a, b)) == 0
