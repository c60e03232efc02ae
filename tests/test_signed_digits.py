"""The signed-digit phase neuron (docs/method.md §1, "Signed digits"): bit-exact against its golden model,
minimal-weight digits, signed spike mode, budget, two-sided surrogate, and the kernel's refusal."""

import itertools

import pytest
import torch

from spikecompile.neuron import (
    PhaseNeuronParams, base2_params, firing_rate, golden_base2, golden_signed_base2, kernel, naf_boundaries,
    phase_decode, phase_encode, phase_quantize, signed_base2_params,
)


def _probe_values(T: int, tau: float) -> torch.Tensor:
    """Dense values, every tie (odd multiples of Δ/2), both zeros, the saturation edge and far beyond."""
    delta = tau * 2.0 ** -T
    dense = torch.linspace(-1.6 * tau, 1.6 * tau, 40001)
    ties = torch.arange(-2 ** (T + 1) - 3, 2 ** (T + 1) + 4) * (delta / 2)
    edge = torch.tensor([0.0, -0.0, tau - delta / 2, -(tau - delta / 2), tau, 1e30, -1e30, delta / 4])
    return torch.cat([dense, ties, edge, torch.randn(20000) * tau / 4])


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 12])
@pytest.mark.parametrize("tau", [1.0, 0.25, 8.0])
def test_base2_signed_neuron_equals_golden_bit_for_bit(T, tau):
    x = _probe_values(T, tau)
    params = signed_base2_params(tau, T)
    sign, spikes = phase_encode(x, params)
    golden_value, golden_digits = golden_signed_base2(x, tau, T)
    assert spikes.dtype == torch.int8 and torch.equal(spikes, golden_digits)
    assert torch.equal(phase_quantize(x, params), golden_value)
    assert torch.equal(phase_decode(sign, spikes, params), golden_value)


@pytest.mark.parametrize("T", [3, 6])
def test_signed_neuron_rounds_to_nearest_and_differs_only_at_ties(T):
    delta = 2.0 ** -T
    x = _probe_values(T, 1.0)
    signed, nearest = phase_quantize(x, signed_base2_params(1.0, T)), golden_base2(x, 1.0, T)
    on_tie = (torch.remainder(2 * x / delta, 2) == 1) & (x.abs() < 1)  # beyond τ a tie saturates like any x
    assert torch.equal(signed[~on_tie], nearest[~on_tie])
    assert bool(((signed[on_tie] - x[on_tie]).abs() == delta / 2).all())  # one of the two nearest levels
    assert signed.abs().max() == (2 ** T - 1) * delta  # saturation as the unsigned code


@pytest.mark.parametrize("T", [1, 2, 4, 6])
def test_digits_have_the_fewest_nonzero_steps_of_any_signed_binary_code(T):
    fewest: dict[int, int] = {}
    for digits in itertools.product((-1, 0, 1), repeat=T):
        level = sum(digit * 2 ** (T - 1 - t) for t, digit in enumerate(digits))
        fewest[level] = min(fewest.get(level, T + 1), sum(map(abs, digits)))
    levels = torch.arange(-(2 ** T - 1), 2 ** T)
    _, digits = phase_encode(levels * 2.0 ** -T, signed_base2_params(1.0, T))
    assert digits.abs().sum(0).tolist() == [fewest[int(level)] for level in levels]
    unsigned = phase_encode(levels * 2.0 ** -T, base2_params(1.0, T))[1]
    assert digits.abs().sum() <= unsigned.sum()


def test_naf_boundaries_are_the_reach_of_the_later_steps():
    assert naf_boundaries(5) == [10, 5, 2, 1, 0]
    assert signed_base2_params(1.0, 5).signed_thresholds().tolist() == [(m + 0.5) / 32 for m in naf_boundaries(5)]


def test_signed_budget_counts_nonzero_steps():
    T = 6
    params = signed_base2_params(1.0, T)
    budgeted = PhaseNeuronParams(**{**params.__dict__, "max_spikes": torch.tensor(2)})
    x = torch.linspace(-1, 1, 4001)
    _, free = phase_encode(x, params)
    _, limited = phase_encode(x, budgeted)
    assert int(limited.abs().sum(0).max()) == 2
    first_two = free.abs().cumsum(0) <= 2
    assert torch.equal(limited, free * first_two)
    assert torch.equal(phase_quantize(x, budgeted), phase_decode(*phase_encode(x, budgeted), budgeted))


def test_signed_neuron_is_odd_and_firing_rate_counts_negative_spikes():
    params = signed_base2_params(0.5, 5)
    x = torch.randn(5000)
    assert torch.equal(phase_quantize(-x, params), -phase_quantize(x, params))
    assert firing_rate(x, params) == float(phase_encode(x, params)[1].abs().float().mean())


def test_surrogate_gradient_is_two_sided():
    """A fire function with a surrogate backward reaches θ through both the +1 and the −1 threshold."""
    theta = torch.full((1,), 2.0, requires_grad=True)
    params = PhaseNeuronParams(tau=torch.tensor(1.0), genotype=torch.zeros(3, dtype=torch.int64),
                               d=torch.full((1,), 2.0), h=torch.full((1,), 2.0), theta=theta, signed_digits=True)

    def fire(residual, threshold, t):
        soft = torch.sigmoid(20 * (residual - threshold))
        return (residual > threshold).to(residual.dtype) + soft - soft.detach()

    for sign in (1.0, -1.0):
        theta.grad = None
        phase_quantize(torch.full((7,), 0.4 * sign), params, fire).sum().backward()
        assert theta.grad is not None and float(theta.grad.abs()) > 0


def test_the_kernel_runs_signed_neurons_as_the_golden_quantizer():
    """Dispatch takes the fused kernel for a signed-digit neuron too (tests/test_kernel.py: bit for bit the
    reference), and its base-2 x̂ is the golden signed quantizer's; a bit code of its digits is refused."""
    params = signed_base2_params(1.0, 4)
    x = torch.randn(64)
    assert kernel.applies(x, params)
    assert torch.equal(phase_quantize(x, params), golden_signed_base2(x, 1.0, 4)[0])
    with pytest.raises(ValueError, match="signed-digit"):
        kernel.fire(x, params, code=True)


def test_signed_digits_must_be_a_bool():
    with pytest.raises(ValueError, match="signed_digits must be a bool"):
        PhaseNeuronParams(**{**base2_params(1.0, 3).__dict__, "signed_digits": 1})


def _heavy_tailed_sites(samples: int = 2048) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(samples, generator=generator)
    laplace = torch.empty(samples).exponential_(generator=generator) * torch.sign(torch.randn(samples, generator=generator))
    silu = torch.nn.functional.silu(2 * torch.randn(samples, generator=generator))
    return torch.stack([gaussian, laplace, silu])


def test_phase_sd_fit_keeps_the_flag_and_is_never_worse_than_signed_base2():
    from spikecompile.conversion.fit import FitConfig, fit_sites

    samples = _heavy_tailed_sites()
    fit = fit_sites(samples, FitConfig(T=6, n_grains=2, coding="phase-sd", rounds=1, search_rounds=4))
    assert fit.params.signed_digits
    assert bool((fit.mse <= fit.base2_mse).all())
    assert torch.allclose(fit.mse, (phase_quantize(samples, fit.params) - samples).square().mean(-1))


def test_signed_base2_cuts_nonzero_steps_at_equal_mse():
    """At the same τ the signed base-2 code has the same levels (off ties) and no more nonzero steps."""
    from spikecompile.conversion.fit import FitConfig, fit_sites

    samples = _heavy_tailed_sites()
    tau = fit_sites(samples, FitConfig(T=8, coding="las")).base2_tau
    for row, site_tau in zip(samples, tau, strict=True):
        unsigned, signed = base2_params(site_tau, 8), signed_base2_params(site_tau, 8)
        # the same levels; τ is not a power of two here, so the sums may differ in their last bit
        assert torch.allclose(phase_quantize(row, unsigned), phase_quantize(row, signed), rtol=0, atol=1e-5)
        assert phase_encode(row, signed)[1].abs().sum() < phase_encode(row, unsigned)[1].sum()


def test_convert_phase_sd_round_trips_through_model_pt(tiny_llama_dir, text_file, tmp_path):
    from click.testing import CliRunner

    from spikecompile import modelfile
    from spikecompile.cli import cli
    from spikecompile.conversion.convert import load_spiking_model

    out = tmp_path / "sd.pt"
    result = CliRunner().invoke(cli, [str(a) for a in (
        "convert", tiny_llama_dir, "-o", out, "--coding", "phase-sd", "-T", 6, "--rotate", "none", "--calib", text_file,
        "--calib-seqlen", 64, "--calib-windows", 2, "--samples-per-site", 512, "--no-progress")])
    assert result.exit_code == 0, result.output
    record = modelfile.load(out)
    assert record["coding"]["name"] == "phase-sd"
    assert all(entry["signed_digits"] for entry in record["sites"].values())
    model = load_spiking_model(str(out))
    assert model is not None
