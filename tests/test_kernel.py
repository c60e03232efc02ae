"""The fused neuron kernel (neuron.kernel) is bitwise the reference neuron (magnitude_spikes +
weighted_spike_sum): random and fitted-like schedules, budgets, v0 of both signs, base 1 (rate), ties on the
thresholds, float32 and float64 (and promotion), odd shapes and layouts; and it falls back to the reference."""

import dataclasses
import math

import pytest
import torch

from spikecompile.neuron import (
    PhaseNeuronParams, base2_params, even_genotype, fire_heaviside, kernel, magnitude_spikes, mask_late_spikes,
    phase_decode, phase_encode, phase_quantize, signed_spikes, step_schedule, weighted_spike_sum,
)

OUTPUTS = dict(out=True, spikes=True, events=True, code=True, popcount=True, rows=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def compiled():
    if not kernel.available():
        pytest.skip("no C++ compiler: only the fallback can be tested")


def params_for(T, n=2, batch=(), base=None, v0=None, budget=0, dtype=torch.float32, seed=0) -> PhaseNeuronParams:
    """Bases scattered around 2 (decoupled d, h, θ, as the fit gives) or all equal to `base`."""
    gen = torch.Generator().manual_seed(seed)
    if base is None:
        bases = {name: (1.6 + 0.8 * torch.rand(*batch, n, generator=gen)).to(dtype) for name in ("d", "h", "theta")}
    else:
        bases = {name: torch.full((*batch, n), float(base), dtype=dtype) for name in ("d", "h", "theta")}
    tau = (0.5 + torch.rand(batch, generator=gen)).to(dtype)
    if v0 is not None:
        v0 = torch.full(batch, float(v0), dtype=dtype) * tau
    return PhaseNeuronParams(tau=tau, genotype=even_genotype(T, n).expand(*batch, T).contiguous(), v0=v0,
                             max_spikes=torch.full(batch, budget, dtype=torch.int64), **bases)


def reference(x, params):
    """The reference neuron written out: (x̂, bool planes [T, *x.shape])."""
    magnitude = x.abs()
    planes = list(magnitude_spikes(magnitude, params, fire_heaviside))
    return torch.sign(x) * weighted_spike_sum(params, planes, magnitude), torch.stack(planes).bool()


def bits(tensor):
    """A float tensor's bit patterns (so -0.0 differs from 0.0 and NaN payloads count)."""
    return tensor.view({torch.float32: torch.int32, torch.float64: torch.int64}[tensor.dtype])


def assert_bitwise(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.is_floating_point():
        assert torch.equal(bits(actual), bits(expected))
    else:
        assert torch.equal(actual, expected)


def assert_matches_reference(x, params):
    fired = kernel.fire(x, params, **OUTPUTS)
    out, planes = reference(x, params)
    assert_bitwise(fired.out, out)
    assert_bitwise(fired.spikes, planes)
    batch = len(params.batch_shape)
    dims = tuple(range(1 + batch, planes.dim()))
    per_step = (planes.sum(dim=dims, dtype=torch.int64) if dims else planes.long()).movedim(0, -1)
    assert torch.equal(fired.per_step, per_step)
    counts = planes.sum(0, dtype=torch.int64)
    assert torch.equal(fired.popcount, counts.to(torch.uint8))
    assert torch.equal(fired.rows, counts.sum(-1) if x.dim() else counts)
    steps = torch.arange(params.T).reshape(-1, *[1] * x.dim())
    assert torch.equal(fired.code.long(), (planes.long() << steps).sum(0))
    # the event form decodes to x̂ when summed in step order
    weights = step_schedule(params)[0].to(x.dtype).movedim(-1, 0).reshape(params.T, *params.batch_shape,
                                                                          *[1] * (x.dim() - batch))
    if fired.out.dtype == x.dtype:
        assert_bitwise(fired.events, torch.sign(x) * weights * planes.to(x.dtype))
    # and the library entry points take the fast path bitwise
    assert_bitwise(phase_quantize(x, params), out)
    sign, spikes = phase_encode(x, params)
    assert torch.equal(spikes, planes) and torch.equal(sign, torch.sign(x).to(torch.int8))
    return fired


def values_around(params, dtype, count=4000, seed=1):
    """Random values of both signs over the whole range, every threshold and reset-shifted threshold exactly
    (ties), their float neighbours, and specials. A signed-digit neuron's ties are those of ±θ_sd(t)."""
    gen = torch.Generator().manual_seed(seed)
    tau = float(params.tau.max())
    x = (torch.rand(count, generator=gen, dtype=torch.float64) * 2.4 - 1.2) * tau
    resets = step_schedule(params)[1].reshape(-1).double()
    if params.signed_digits:
        thresholds = params.signed_thresholds().reshape(-1).double()
        ties = torch.cat([thresholds, thresholds + resets[0], resets[0] - thresholds,
                          thresholds + resets[:1] - resets[1:2]])
    else:
        thresholds = params.thresholds().reshape(-1).double()
        ties = torch.cat([thresholds, thresholds + resets[0], thresholds + resets[:1] + resets[1:2]])
    ties = ties.to(dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    near = torch.cat([ties, torch.nextafter(ties, inf), torch.nextafter(ties, -inf)])
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -1e-40, 1e30, -1e30], dtype=dtype)
    return torch.cat([x.to(dtype), near, -near, specials])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("budget", [0, 1, 2, 7])
@pytest.mark.parametrize("v0", [None, -0.3, 0.02])
@pytest.mark.parametrize("base", [None, 1.0, 2.0])
def test_bitwise_equal_to_the_reference(dtype, budget, v0, base):
    for seed, T in enumerate((1, 3, 8, 11)):
        params = params_for(T, n=min(2, T), base=base, v0=v0, budget=budget, dtype=dtype, seed=seed)
        x = values_around(params, dtype, seed=seed)
        assert_matches_reference(x, params)
        assert_matches_reference(x[: 37 * 13].reshape(37, 13), params)  # rows shorter than a vector, tails


def test_base2_ties_are_exact():
    """τ a power of two: every threshold and reset is exact, so |x| lands exactly on them at every step."""
    T = 8
    params = base2_params(0.5, T, n=2)
    step = 0.5 * 2.0**-T
    x = torch.arange(-(2**T + 4) * 2, (2**T + 4) * 2 + 1, dtype=torch.float32) * (step / 2)
    fired = assert_matches_reference(x, params)
    assert int(fired.per_step.sum()) > 0


@pytest.mark.parametrize("T", [16, 31, 40, 64])
def test_long_trains(T):
    params = params_for(T, n=3, budget=5 if T == 40 else 0, seed=T)
    x = values_around(params, torch.float32, count=500)
    if T <= 31:
        assert_matches_reference(x, params)
    else:  # no code past 31 steps; everything else
        fired = kernel.fire(x, params, out=True, spikes=True, rows=True)
        out, planes = reference(x, params)
        assert_bitwise(fired.out, out)
        assert torch.equal(fired.spikes, planes)
        with pytest.raises(ValueError, match="at most 31 steps"):
            kernel.fire(x, params, code=True)


def test_batched_sites():
    params = params_for(6, n=2, batch=(3, 2), v0=-0.1, budget=2, seed=5)
    x = torch.randn(3, 2, 9, 21, generator=torch.Generator().manual_seed(2)) * 0.7
    fired = assert_matches_reference(x, params)
    assert fired.per_step.shape == (3, 2, 6)
    mixed = dict(tau=params.tau, genotype=params.genotype, d=params.d, h=params.h, theta=params.theta, v0=params.v0,
                 max_spikes=torch.tensor([[0, 1], [7, 0], [2, 3]]))  # a budget at some sites only
    assert_matches_reference(x, PhaseNeuronParams(**mixed))


def test_layouts_and_shapes():
    params = params_for(8, seed=3)
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(5, 7, 33, generator=gen)
    for x in (base.transpose(0, 2), base[:, ::2, 1:], base[0, 0, 0], base.new_zeros(0, 4), base.new_zeros(3, 0),
              torch.randn(1, generator=gen), base[:1, :1].expand(4, 3, 33)):
        assert_matches_reference(x, params)
    fired = kernel.fire(base[0, 0, 0], params, **OUTPUTS)
    assert fired.out.shape == () and fired.rows.shape == () and fired.per_step.shape == (8,)


@pytest.mark.parametrize("x_dtype, params_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                                   (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
def test_dtype_promotion_as_the_reference(x_dtype, params_dtype):
    params = params_for(8, v0=-0.05, budget=3, dtype=params_dtype, seed=7)
    x = values_around(params, torch.float64, count=800).to(x_dtype)
    out, planes = reference(x, params)
    fired = kernel.fire(x, params, out=True, spikes=True, rows=True)
    assert_bitwise(fired.out, out)
    assert torch.equal(fired.spikes, planes)
    assert_bitwise(phase_quantize(x, params), out)


def test_threads_and_determinism():
    """Above the parallel threshold, with two threads: the same bits as one thread and as the reference."""
    params = params_for(8, v0=-0.2, budget=2, seed=9)
    x = torch.randn(3, 200, 130, generator=torch.Generator().manual_seed(6))
    one = kernel.fire(x, params, **OUTPUTS)
    torch.set_num_threads(2)
    two = kernel.fire(x, params, **OUTPUTS)
    again = kernel.fire(x, params, **OUTPUTS)
    for name in OUTPUTS:
        assert torch.equal(getattr(one, name), getattr(two, name)) and torch.equal(getattr(two, name), getattr(again, name))
    assert torch.equal(one.per_step, two.per_step)
    assert_bitwise(two.out, reference(x, params)[0])


def test_autograd_keeps_the_reference():
    params = params_for(8, seed=2)
    x = torch.randn(50, requires_grad=True)
    surrogate = lambda r, th, t: fire_heaviside(r, th, t) + (r - r.detach())  # noqa: E731
    phase_quantize(x, params, surrogate).sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        assert_bitwise(phase_quantize(x, params), reference(x.detach(), params)[0])


def test_decode_of_the_fused_encode_is_the_fused_quantize():
    params = params_for(7, n=3, v0=0.01, seed=11)
    x = torch.randn(4, 5, 6)
    assert_bitwise(phase_decode(*phase_encode(x, params), params), phase_quantize(x, params))


def test_falls_back_to_the_reference_with_one_warning(monkeypatch, tmp_path):
    params = params_for(8, v0=-0.1, budget=2, seed=12)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(8))
    fast = kernel.fire(x, params, **OUTPUTS)
    for env in (dict(SPIKECOMPILE_NO_KERNEL="1"),
                dict(CXX=str(tmp_path / "no-such-compiler"), SPIKECOMPILE_KERNEL_CACHE=str(tmp_path / "cache"))):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        kernel._reset()
        try:
            with pytest.warns(RuntimeWarning, match="not available"):
                slow = kernel.fire(x, params, **OUTPUTS)
            assert not kernel.available() and kernel.library_path() is None
            for name in OUTPUTS:
                assert_bitwise(getattr(slow, name), getattr(fast, name))
            assert torch.equal(slow.per_step, fast.per_step)
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # once only
                assert_bitwise(phase_quantize(x, params), fast.out)
        finally:
            for name in env:
                monkeypatch.delenv(name)
            kernel._reset()
    assert kernel.available()


def test_builds_into_a_fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPIKECOMPILE_KERNEL_CACHE", str(tmp_path))
    kernel._reset()
    try:
        assert kernel.available() and kernel.library_path().parent == tmp_path
        assert 0 < kernel.compile_seconds() < 60
        params = params_for(5, seed=13)
        x = torch.randn(100)
        assert_bitwise(kernel.quantize(x, params), reference(x, params)[0])
    finally:
        kernel._reset()


def signed_reference(x, params):
    """The signed-digit neuron written out: (x̂ = Σ_t d(t)·s_t, int8 digit planes [T, *x.shape])."""
    planes = list(signed_spikes(x, params))
    return weighted_spike_sum(params, planes, x), torch.stack(planes).to(torch.int8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("budget", [0, 1, 2, 7])
@pytest.mark.parametrize("v0", [None, -0.3, 0.02])
@pytest.mark.parametrize("base", [None, 2.0])
def test_signed_digits_bitwise_equal_to_the_reference(dtype, budget, v0, base):
    """The signed-digit neuron in the kernel: x̂, int8 digit planes, counts of nonzero digits (per step, per row,
    popcount) and the event form, bit for bit the reference's; a code is refused (digits are no bit code)."""
    for seed, T in enumerate((1, 3, 8, 11)):
        params = dataclasses.replace(params_for(T, n=min(2, T), base=base, v0=v0, budget=budget, dtype=dtype,
                                                seed=seed), signed_digits=True)
        for x in (values_around(params, dtype, seed=seed), torch.randn(37, 13, dtype=dtype) * 0.7):
            fired = kernel.fire(x, params, out=True, spikes=True, events=True, popcount=True, rows=True)
            out, planes = signed_reference(x, params)
            assert_bitwise(fired.out, out)
            assert_bitwise(fired.spikes, planes)
            assert int((planes == -1).sum()) > 0 and int((planes == 1).sum()) > 0
            nonzero = planes != 0
            dims = tuple(range(1, planes.dim()))
            assert torch.equal(fired.per_step, nonzero.sum(dim=dims, dtype=torch.int64))
            counts = nonzero.sum(0, dtype=torch.int64)
            assert torch.equal(fired.popcount, counts.to(torch.uint8))
            assert torch.equal(fired.rows, counts.sum(-1) if x.dim() > 1 else counts.sum())
            weights = step_schedule(params)[0].to(x.dtype).reshape(params.T, *[1] * x.dim())
            if fired.out.dtype == x.dtype:
                assert_bitwise(fired.events, weights * planes.to(x.dtype))
            if budget:
                assert int(counts.max()) <= budget
            # the library entry points take the fused path, bitwise
            assert_bitwise(phase_quantize(x, params), out)
            sign, spikes = phase_encode(x, params)
            assert torch.equal(spikes, planes) and torch.equal(sign, torch.sign(x).to(torch.int8))
            with pytest.raises(ValueError, match="no bit code"):
                kernel.fire(x, params, code=True)


def test_signed_digits_fallback_is_the_reference(monkeypatch):
    """Without the compiled kernel, fire() answers a signed-digit neuron from the reference, the same fields."""
    params = dataclasses.replace(params_for(8, n=2, budget=3), signed_digits=True)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    fused = kernel.fire(x, params, out=True, spikes=True, events=True, popcount=True, rows=True)
    monkeypatch.setattr(kernel, "_library", lambda: None)
    eager = kernel.fire(x, params, out=True, spikes=True, events=True, popcount=True, rows=True)
    for field in ("out", "spikes", "events", "popcount", "rows", "per_step"):
        assert_bitwise(getattr(eager, field), getattr(fused, field))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("budget", [0, 2, 5])
@pytest.mark.parametrize("mask_steps", [1, 2, 3, 8])
def test_late_spike_masking_bitwise_equal_to_the_reference(signed, dtype, budget, mask_steps):
    """Masking in the kernel (keep the spikes at steps < first spike + m): x̂, planes, events and every count are
    the reference's spikes (budget included) masked by mask_late_spikes, then decoded, bit for bit; the eager
    fallback gives the same; masking only removes spikes."""
    for seed, T in enumerate((3, 8, 11)):
        params = dataclasses.replace(params_for(T, n=min(2, T), budget=budget, dtype=dtype, seed=seed),
                                     signed_digits=signed)
        for x in (values_around(params, dtype, seed=seed), torch.randn(37, 13, dtype=dtype) * 0.7):
            fired = kernel.fire(x, params, mask_steps=mask_steps, **{**OUTPUTS, "code": not signed})
            if signed:
                planes = mask_late_spikes(torch.stack(list(signed_spikes(x, params))).to(torch.int8), mask_steps)
                out = weighted_spike_sum(params, list(planes.to(x.dtype)), x)
                events = step_schedule(params)[0].to(x.dtype).reshape(T, *[1] * x.dim()) * planes.to(x.dtype)
            else:
                planes = mask_late_spikes(reference(x, params)[1], mask_steps)
                out = torch.sign(x) * weighted_spike_sum(params, list(planes.to(x.dtype)), x.abs())
                events = (torch.sign(x).to(torch.int8).to(x.dtype)
                          * step_schedule(params)[0].to(x.dtype).reshape(T, *[1] * x.dim()) * planes.to(x.dtype))
            assert_bitwise(fired.out, out)
            assert_bitwise(fired.spikes, planes)
            assert_bitwise(fired.events, events)
            nonzero = planes != 0
            counts = nonzero.sum(0, dtype=torch.int64)
            assert torch.equal(fired.per_step, nonzero.sum(dim=tuple(range(1, planes.dim())), dtype=torch.int64))
            assert torch.equal(fired.popcount, counts.to(torch.uint8))
            assert torch.equal(fired.rows, counts.sum(-1) if x.dim() > 1 else counts.sum())
            if not signed:
                steps = torch.arange(T).reshape(-1, *[1] * x.dim())
                assert torch.equal(fired.code.long(), (planes.long() << steps).sum(0))
            unmasked = kernel.fire(x, params, spikes=True).spikes
            assert int(counts.sum()) <= int((unmasked != 0).sum())
            if mask_steps <= 2 and budget != 1:
                assert int(counts.sum()) < int((unmasked != 0).sum())  # late spikes were there to drop
            eager = kernel._reference(x, params, True, True, True, not signed, True, True, mask_steps)
            for field in ("out", "spikes", "events", "popcount", "rows", "per_step"):
                assert_bitwise(getattr(eager, field), getattr(fired, field))


def test_mask_steps_below_one_is_refused():
    with pytest.raises(ValueError, match="mask_steps must be at least 1"):
        kernel.fire(torch.ones(3), params_for(4), mask_steps=0)



@pytest.mark.parametrize("vector_bytes", [16, 32, 64])
def test_every_lane_width_is_the_reference(vector_bytes, monkeypatch, tmp_path):
    """The kernel built with 16-, 32- and 64-byte vectors (what -march=native picks on SSE2, AVX and AVX-512 CPUs;
    here forced with -DVECTOR_BYTES, so every width runs on this CPU) gives the reference's bits: the lane count
    changes no result, only the speed."""
    library = kernel.build_variant(tmp_path / "neuron.so", [f"-DVECTOR_BYTES={vector_bytes}"])
    monkeypatch.setitem(kernel._state, "library", library)
    for dtype in (torch.float32, torch.float64):
        for seed, (T, budget) in enumerate(((8, 0), (11, 3))):
            params = params_for(T, n=2, v0=0.02, budget=budget, dtype=dtype, seed=seed)
            x = values_around(params, dtype, seed=seed)
            assert_matches_reference(x, params)
            assert_matches_reference(x[: 37 * 13].reshape(37, 13), params)
            signed = dataclasses.replace(params, signed_digits=True)
            assert_bitwise(kernel.fire(x, signed, out=True).out, signed_reference(x, signed)[0])
            masked = kernel.fire(x, params, spikes=True, mask_steps=2).spikes
            assert torch.equal(masked, mask_late_spikes(reference(x, params)[1], 2))
