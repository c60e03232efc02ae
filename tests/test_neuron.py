"""The phase neuron: base 2 is bit-exact against the closed form; spike and decoded modes agree; batching."""

import math

import pytest
import torch

from spikecompile.neuron import (
    PhaseNeuronParams, base2_params, even_genotype, golden_base2, initial_potential, phase_decode, phase_encode,
    phase_quantize, step_schedule,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_params(batch=(), T=8, n=2, seed=0):
    """A neuron with bases scattered around 2 (decoupled d, h, θ), the kind the fit produces."""
    gen = torch.Generator().manual_seed(seed)
    bases = {name: 1.7 + 0.6 * torch.rand(*batch, n, generator=gen) for name in ("d", "h", "theta")}
    tau = 0.5 + torch.rand(batch, generator=gen)
    return PhaseNeuronParams(tau=tau, genotype=even_genotype(T, n).expand(*batch, T).contiguous(), **bases)


def adversarial_values(tau, T):
    """Every multiple of Δ/2 (ties and thresholds) out to beyond saturation, their float neighbours, both
    signs, and values just above 2^e − v0, where the float sum |x| + v0 would round onto a threshold."""
    half_steps = torch.arange(-(2**T + 3) * 2, (2**T + 3) * 2 + 1, dtype=torch.float32) * (tau * 2.0**-T / 2)
    inf = torch.tensor(math.inf)
    near = torch.cat([half_steps, torch.nextafter(half_steps, inf), torch.nextafter(half_steps, -inf)])
    powers = torch.exp2(torch.arange(-30, 8, dtype=torch.float32))
    crossing = powers - initial_potential(tau, T)
    above = torch.nextafter(crossing, powers)
    crossing = torch.cat([crossing, above, torch.nextafter(above, powers)])
    return torch.cat([near, crossing, -crossing, torch.tensor([0.0, -0.0, 1e30, -1e30])])


def test_even_genotype_gives_extra_steps_to_earlier_blocks():
    assert even_genotype(8, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert even_genotype(5, 1).tolist() == [0] * 5
    with pytest.raises(ValueError, match="1 ≤ n ≤ T"):
        even_genotype(4, 5)


def test_golden_rounds_to_nearest_with_ties_toward_zero_and_saturates():
    # T = 2, τ = 1: Δ = 1/4, magnitudes 0..3 steps.
    x = torch.tensor([0.0, 0.125, 0.1251, 0.375, 0.3751, 0.7, 5.0, -0.125, -0.3751, -5.0])
    expected = torch.tensor([0.0, 0.0, 0.25, 0.25, 0.5, 0.75, 0.75, 0.0, -0.5, -0.75])
    assert torch.equal(golden_base2(x, 1.0, 2), expected)
    assert torch.equal(phase_quantize(x, base2_params(1.0, 2)), expected)


@pytest.mark.parametrize("T", range(4, 17))
@pytest.mark.parametrize("tau", [2.0**-3, 1.0, 2.0**5])
def test_base2_neuron_is_bit_exact_against_golden(T, tau):
    gen = torch.Generator().manual_seed(T)
    scale = tau * torch.exp2(torch.randint(-T - 2, 3, (20000,), generator=gen).float())
    x = torch.cat([torch.randn(20000, generator=gen) * scale, adversarial_values(tau, T)])
    neuron = base2_params(tau, T)
    assert torch.equal(phase_quantize(x, neuron), golden_base2(x, tau, T))
    assert torch.equal(phase_decode(*phase_encode(x, neuron), neuron), golden_base2(x, tau, T))


def test_multi_grain_base2_neuron_is_still_the_uniform_quantizer():
    x = adversarial_values(0.5, 8)
    assert torch.equal(phase_quantize(x, base2_params(0.5, 8, n=3)), golden_base2(x, 0.5, 8))


def test_schedule_uses_the_global_step_exponent():
    neuron = PhaseNeuronParams(tau=torch.tensor(2.0), genotype=torch.tensor([0, 0, 1, 1]),
                               d=torch.tensor([3.0, 5.0]), h=torch.tensor([1.5, 2.5]), theta=torch.tensor([4.0, 6.0]))
    d, h, theta = step_schedule(neuron)
    torch.testing.assert_close(d, 2.0 * torch.tensor([3.0**-1, 3.0**-2, 5.0**-3, 5.0**-4]))
    torch.testing.assert_close(h, 2.0 * torch.tensor([1.5**-1, 1.5**-2, 2.5**-3, 2.5**-4]))
    torch.testing.assert_close(theta, 2.0 * torch.tensor([4.0**-1, 4.0**-2, 6.0**-3, 6.0**-4]))
    assert initial_potential(2.0, 4).item() == 2.0 * 2.0**-5


def test_dynamics_match_a_literal_scalar_reference():
    """v = |x| + v0; s_t = [v > θ(t)]; v -= h(t)·s_t, element by element in float64 (x̂ in float64 too)."""
    neuron = random_params(T=6, n=3, seed=1)
    x = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.6
    d, h, theta = (values.double().tolist() for values in step_schedule(neuron))
    v0 = initial_potential(neuron.tau, neuron.T).double().item()
    expected_spikes, expected = [], []
    for value in x.tolist():
        v, spikes = abs(value) + v0, []
        for t in range(neuron.T):
            spikes.append(v > theta[t])
            v -= h[t] * spikes[-1]
        expected_spikes.append(spikes)
        expected.append(math.copysign(1.0, value) * sum(w * s for w, s in zip(d, spikes, strict=True)))
    sign, spikes = phase_encode(x, neuron)
    assert spikes.T.tolist() == expected_spikes
    torch.testing.assert_close(phase_quantize(x, neuron), torch.tensor(expected, dtype=torch.float64))


def test_spike_and_decoded_modes_agree_bitwise():
    neuron = random_params(batch=(3,), T=8, n=2)
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(3))
    sign, spikes = phase_encode(x, neuron)
    assert sign.dtype == torch.int8 and sign.shape == x.shape
    assert spikes.dtype == torch.bool and spikes.shape == (8, *x.shape)
    decoded = phase_quantize(x, neuron)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, phase_decode(sign, spikes, neuron))
    weighted_planes = step_schedule(neuron)[0].T[:, :, None, None] * spikes
    torch.testing.assert_close(decoded, sign * weighted_planes.sum(0))


def test_batched_sites_equal_per_site_calls():
    neuron = random_params(batch=(4,), T=7, n=3, seed=4)
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(5))
    per_site = [PhaseNeuronParams(**{name: getattr(neuron, name)[s] for name in
                                     ("tau", "genotype", "d", "h", "theta")}) for s in range(4)]
    expected = torch.stack([phase_quantize(x[s], p) for s, p in enumerate(per_site)])
    assert torch.equal(phase_quantize(x, neuron), expected)
    assert torch.equal(phase_encode(x, neuron)[1],
                       torch.stack([phase_encode(x[s], p)[1] for s, p in enumerate(per_site)], dim=1))
    assert neuron.batch_shape == (4,) and neuron.T == 7 and neuron.n_grains == 3


def test_batch_shape_must_prefix_the_input():
    with pytest.raises(ValueError, match="prefix"):
        phase_quantize(torch.zeros(5, 3), random_params(batch=(3,)))


def test_decode_checks_the_spike_shape():
    neuron = base2_params(1.0, 4)
    sign, spikes = phase_encode(torch.zeros(3), neuron)
    with pytest.raises(ValueError, match="spikes"):
        phase_decode(sign, spikes[:3], neuron)


def _with(**changes):
    fields = dict(tau=torch.tensor([1.0]), genotype=torch.tensor([[0, 0, 1, 1]]), d=torch.full((1, 2), 2.0),
                  h=torch.full((1, 2), 2.0), theta=torch.full((1, 2), 2.0))
    return {**fields, **changes}


@pytest.mark.parametrize("changes, message", [
    (dict(tau=torch.tensor([0.0])), "tau"),
    (dict(tau=torch.tensor([math.nan])), "tau"),
    (dict(tau=torch.tensor([1])), "float"),
    (dict(d=torch.tensor([[2.0, -1.0]])), "d bases"),
    (dict(theta=torch.tensor([[2.0, math.inf]])), "theta bases"),
    (dict(h=torch.full((1, 3), 2.0)), "h must be"),
    (dict(genotype=torch.tensor([[0, 1, 0, 1]])), "genotype"),
    (dict(genotype=torch.tensor([[0, 0, 0, 0]])), "genotype"),
    (dict(genotype=torch.tensor([[1, 1, 1, 1]])), "genotype"),
    (dict(genotype=torch.tensor([[0, 0, 1, 1]], dtype=torch.int32)), "int64"),
    (dict(genotype=torch.tensor([0, 0, 1, 1])), "genotype"),
])
def test_invalid_params_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        PhaseNeuronParams(**_with(**changes))


def test_derived_is_the_checked_neuron_with_its_changes():
    params = random_params(batch=(5,), seed=3)
    rows = torch.tensor([1, 3])
    bases = {name: 1 + torch.exp(torch.full((5, 2), 0.1 * k)) for k, name in enumerate(("d", "h", "theta"))}
    derived = params.derived(**bases)
    checked = PhaseNeuronParams(tau=params.tau, genotype=params.genotype, v0=params.v0, max_spikes=params.max_spikes,
                                **bases)
    tensors = ("tau", "genotype", "d", "h", "theta", "v0", "max_spikes")
    for name in tensors:
        assert torch.equal(getattr(derived, name), getattr(checked, name))
    x = torch.randn(5, 64)
    assert torch.equal(phase_quantize(x, derived), phase_quantize(x, checked))
    sliced = params.derived(**{name: getattr(params, name)[rows] for name in tensors})
    assert sliced.batch_shape == (2,) and torch.equal(sliced.theta, params.theta[rows])
    assert params.derived().tau is params.tau  # nothing changed: the same tensors
    with pytest.raises(TypeError, match="no fields"):
        params.derived(bases=bases["d"])
