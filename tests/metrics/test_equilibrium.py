import math

import pytest
import torch

from deq_lightning.metrics.equilibrium import ResidualQuantile, equilibrium_metrics

BIN = 10 ** (1 / 20)  # one histogram bin: 20 per decade


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
def test_quantile_within_one_bin_of_the_exact_one(q):
    g = torch.Generator().manual_seed(0)
    residuals = 10 ** (torch.rand(5000, generator=g, dtype=torch.float64) * 6 - 7)  # 1e-7 .. 1e-1
    metric = ResidualQuantile(q)
    for chunk in residuals.split(512):  # many batches, as in an epoch
        metric.update(chunk)
    exact = torch.quantile(residuals, q).item()
    got = metric.compute().item()
    assert exact / BIN <= got <= exact * BIN


def test_max_is_exact_and_nonfinite_counts_as_large():
    metric = ResidualQuantile(1.0)
    metric.update(torch.tensor([1e-4, 3e-3, 2e-2]))
    assert metric.compute().item() == pytest.approx(2e-2)
    median = ResidualQuantile(0.5)
    median.update(torch.tensor([1e-6, float("nan"), float("inf")]))
    # Two of three samples are non-finite: the median must not look converged.
    assert median.compute().item() >= 1e3
    metric.update(torch.tensor([float("nan")]))
    assert math.isinf(metric.compute().item())


def test_empty_metric_is_nan_and_reset_clears():
    metric = ResidualQuantile(0.5)
    assert math.isnan(metric.compute().item())
    metric.update(torch.tensor([0.5]))
    metric.reset()
    metric.update(torch.tensor([1e-5]))
    assert metric.compute().item() < 2e-5


def test_bad_quantile_rejected():
    with pytest.raises(ValueError, match="q must be in"):
        ResidualQuantile(0.0)


def test_histograms_add_like_one_big_batch():
    # What DDP does: states summed over processes equal one process that saw everything.
    a, b, both = ResidualQuantile(0.9), ResidualQuantile(0.9), ResidualQuantile(0.9)
    x, y = torch.logspace(-6, -2, 300), torch.logspace(-3, 0, 100)
    a.update(x)
    b.update(y)
    both.update(torch.cat([x, y]))
    a.counts += b.counts
    a.peak = torch.maximum(a.peak, b.peak)
    assert a.compute() == both.compute()


def test_equilibrium_metrics_names():
    assert set(equilibrium_metrics()) == {"converged", "steps", "res_p50", "res_p90", "res_max"}
