"""Fitting: never worse than base 2, clearly better on heavy tails, τ by error, deterministic, Lloyd-Max bound."""

import pytest
import torch

from spikecompile.conversion import fit as fit_module
from spikecompile.conversion.fit import FitConfig, fit_sites, lloyd_max_mse, quantizer_mse
from spikecompile.neuron import base2_params, even_genotype

N = 2048


def laplace(sites, gen, outliers=0.002):
    u = torch.rand(sites, N, generator=gen) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    return torch.where(torch.rand(sites, N, generator=gen) < outliers, 40 * x, x)


def realistic_sites(seed=0):
    """Gaussian mixture, Laplace with outliers, post-softmax probabilities, SiLU outputs, zeros, a constant."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.rand(2, N, generator=gen) < 0.3
    mixture = torch.randn(2, N, generator=gen) * torch.where(wide, 3.0, 1.0)
    softmax = torch.softmax(2.5 * torch.randn(2, N // 128, 128, generator=gen), dim=-1).reshape(2, N)
    silu = torch.nn.functional.silu(1.5 * torch.randn(2, N, generator=gen) + 0.2)
    return torch.cat([mixture, laplace(2, gen), softmax, silu, torch.zeros(1, N), torch.full((1, N), -0.7)])


@pytest.fixture(scope="module")
def fitted():
    samples = realistic_sites()
    return samples, fit_sites(samples, FitConfig(T=6, n_grains=2))


def test_fitted_mse_is_never_above_base2(fitted):
    samples, fit = fitted
    assert (fit.mse <= fit.base2_mse).all()
    assert fit.mse[-2] == 0 and (fit.base2_mse[:-2] > 0).all()


def test_reported_mse_is_the_mse_of_the_returned_neuron(fitted):
    samples, fit = fitted
    torch.testing.assert_close(quantizer_mse(samples, fit.params), fit.mse, rtol=1e-6, atol=0)
    base2 = base2_params(fit.base2_tau, 6, 2)
    torch.testing.assert_close(quantizer_mse(samples, base2), fit.base2_mse, rtol=1e-6, atol=0)
    assert torch.equal(fit.max_abs, samples.abs().amax(-1))


def test_fitting_clearly_beats_base2_on_heavy_tails():
    fit = fit_sites(laplace(4, torch.Generator().manual_seed(1)), FitConfig(T=6, n_grains=2))
    assert (fit.mse / fit.base2_mse).median() < 0.85


def test_tau_chosen_by_error_beats_max_abs_on_outliers():
    gen = torch.Generator().manual_seed(2)
    samples = torch.randn(3, N, generator=gen)
    samples[:, 0] = 30.0
    at_max = quantizer_mse(samples, base2_params(samples.abs().amax(-1), 4))
    for coding in ("las", "phase"):
        fit = fit_sites(samples, FitConfig(T=4, coding=coding))
        assert (fit.base2_tau < 0.75 * fit.max_abs).all()
        assert (fit.base2_mse < 0.75 * at_max).all() and (fit.mse <= fit.base2_mse).all()


def test_las_coding_keeps_base2_bases():
    samples = realistic_sites()
    fit = fit_sites(samples, FitConfig(T=5, n_grains=2, coding="las"))
    for name in ("d", "h", "theta"):
        assert (getattr(fit.params, name) == 2.0).all()
    assert torch.equal(fit.params.tau, fit.base2_tau) and torch.equal(fit.mse, fit.base2_mse)


def test_fit_is_deterministic():
    samples = realistic_sites(seed=3)[:4]
    cfg = FitConfig(T=5, n_grains=2, rounds=2, hw_steps=5, base_steps=5)
    first, second = fit_sites(samples, cfg), fit_sites(samples, cfg)
    for name in ("tau", "genotype", "d", "h", "theta"):
        assert torch.equal(getattr(first.params, name), getattr(second.params, name))
    assert torch.equal(first.mse, second.mse) and torch.equal(first.base2_mse, second.base2_mse)


@pytest.mark.parametrize("penalty", [0.0, 0.05])
def test_fitting_on_several_threads_is_fitting_on_one(penalty, monkeypatch):
    """fit_sites runs Algorithm 1 on one Python thread per torch thread the caller has, each on its own sites, and its
    other stages' row chunks on as many threads: the result is bit for bit the one-thread fit (with and without the
    spike penalty), and torch's thread count is the caller's again afterwards."""
    samples = realistic_sites(seed=5)
    monkeypatch.setattr(fit_module, "CHUNK_ELEMENTS", 2 * N)  # two sites a chunk: chunks for every thread
    assert len(fit_module._row_chunks((len(samples),), samples.shape[-1])) == 5
    cfg = FitConfig(T=6, n_grains=2, rounds=2, hw_steps=4, base_steps=4, spike_penalty=penalty)
    threads = torch.get_num_threads()
    try:
        fits = {}
        for count in (1, 3):
            torch.set_num_threads(count)
            fits[count] = fit_sites(samples, cfg)
            assert torch.get_num_threads() == count
    finally:
        torch.set_num_threads(threads)
    for name in ("tau", "genotype", "d", "h", "theta"):
        assert torch.equal(getattr(fits[1].params, name), getattr(fits[3].params, name))
    assert torch.equal(fits[1].mse, fits[3].mse) and torch.equal(fits[1].base2_mse, fits[3].base2_mse)


def test_genotypes_are_respected():
    samples = realistic_sites()[:3]
    genotypes = torch.stack([even_genotype(6, 2), torch.tensor([0, 1, 1, 1, 1, 1]), torch.tensor([0, 0, 0, 0, 0, 1])])
    fit = fit_sites(samples, FitConfig(T=6, n_grains=2, rounds=1), genotypes=genotypes)
    assert torch.equal(fit.params.genotype, genotypes)
    torch.testing.assert_close(quantizer_mse(samples, fit.params), fit.mse, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="genotypes"):
        fit_sites(samples, FitConfig(T=6, n_grains=2), genotypes=genotypes[:, :5])


def test_progress_is_reported_after_every_step():
    calls = []
    fit_sites(realistic_sites()[:2], FitConfig(T=4, rounds=2, hw_steps=3, base_steps=2),
              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(step, 10) for step in range(1, 11)]
    fit_sites(realistic_sites()[:2], FitConfig(T=4, rounds=1, hw_steps=1, base_steps=1), progress=True)
    with pytest.raises(TypeError, match="progress"):
        fit_sites(realistic_sites()[:2], FitConfig(T=4), progress="yes")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="coding"):
        FitConfig(T=4, coding="pulse")
    with pytest.raises(ValueError, match="n_grains"):
        FitConfig(T=4, n_grains=5)
    with pytest.raises(ValueError, match=r"\[S, N\]"):
        fit_sites(torch.zeros(10), FitConfig(T=4))
    bad = torch.zeros(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"sites \[1\]"):
        fit_sites(bad, FitConfig(T=4))
    with pytest.raises(ValueError, match=r"samples of sites layers\.0\.k are not all finite"):
        fit_sites(bad, FitConfig(T=4), names=["layers.0.q", "layers.0.k", "layers.0.v"])


def test_lloyd_max_matches_known_optima():
    gen = torch.Generator().manual_seed(4)
    uniform = 2 * torch.rand(2, 1 << 16, generator=gen) - 1
    torch.testing.assert_close(lloyd_max_mse(uniform, 15), torch.full((2,), (2 / 15) ** 2 / 12), rtol=0.03, atol=0)
    # Max (1960): the 8-level Lloyd-Max quantizer of N(0, 1) has MSE 0.03455.
    gaussian = torch.randn(2, 1 << 17, generator=gen)
    torch.testing.assert_close(lloyd_max_mse(gaussian, 8), torch.full((2,), 0.03455), rtol=0.02, atol=0)


def test_lloyd_max_bounds_the_fitted_neuron(fitted):
    samples, fit = fitted
    assert (lloyd_max_mse(samples, 2 ** 7 - 1) <= fit.mse * (1 + 1e-5)).all()
