"""The deployed Loihi 2 formats (hardware/loihi2.py), the fixed-point run (passes/fixed_point.py, the simulator's --numerics loihi2) and
Lava's fixed_pt program: bit for bit equal — every spike count, every integer potential at the start of firing and
residual at the end of each window, every output — on the tiny model (lava tests: skipped without lava-nc) and on
SmolLM2 (slow)."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny, requires_smollm2

from spikecompile.backends.lava import build_lava
from spikecompile.backends.lava.emit import example_inputs, select_part
from spikecompile.neuron import kernel
from spikecompile.passes.fixed_point import FiringTable, fire, firing_table, integrate_and_fire, run_fixed
from spikecompile.backends.sim.simulate import output_of, run
from spikecompile.build import BuildOptions, build
from spikecompile.cli import cli
from spikecompile.errors import SpikecompileError
from spikecompile.hardware.loihi2 import gain, load_loihi2, payload_grid, quantize_rows, site_format, synapse_format
from spikecompile.neuron import PhaseNeuronParams
from spikecompile.passes.loihi_mapping import deployed_formats

requires_lava = pytest.mark.skipif(importlib.util.find_spec("lava") is None,
                                   reason="lava-nc is not installed (scripts/install.sh installs lava-nc 0.10.0)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(convert_tiny(tmp_path_factory.mktemp("fixed")), BuildOptions())


# ---- formats (no lava needed) -------------------------------------------------------------------------------------

def test_row_quantization_reproduces_an_rtn_grid_and_stays_within_half_a_step():
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 1.0, size=16)
    mantissa = rng.integers(-127, 128, size=(16, 32))
    mantissa[:, 0] = 127  # each row reaches the top, as RTN's absmax grid does
    weights = (mantissa * scale[:, None]).astype(np.float32)
    found, found_scale = quantize_rows(weights, 8)
    assert np.array_equal(found, mantissa)
    noisy = rng.normal(size=(8, 64))
    m, s = quantize_rows(noisy, 8)
    assert np.abs(noisy - m * s[:, None]).max() <= s.max() / 2 + 1e-12 and m.dtype == np.int8


def test_payload_grid_is_exact_for_base_2_and_rounds_learned_bases():
    levels, delta = payload_grid(0.75 * 2.0 ** -np.arange(1, 9), 24, "s")
    assert levels.tolist() == [128, 64, 32, 16, 8, 4, 2, 1] and delta == 0.75 * 2.0 ** -8
    levels, delta = payload_grid(np.array([1.733, 0.8561, 0.423, 0.2168]), 24, "s")
    assert np.abs(levels * delta - [1.733, 0.8561, 0.423, 0.2168]).max() <= delta / 2
    with pytest.raises(SpikecompileError, match="site s: .*graded payload"):
        payload_grid(2.0 ** -np.arange(1, 12), 8, "s")


def test_a_site_whose_grid_cannot_hold_its_thresholds_is_refused():
    params = PhaseNeuronParams(tau=torch.tensor(1.0), genotype=torch.zeros(30, dtype=torch.int64),
                               d=torch.tensor([2.0]), h=torch.tensor([2.0]), theta=torch.tensor([2.0]))
    with pytest.raises(SpikecompileError, match="site deep: .*fewer than T = 30"):
        site_format(params, load_loihi2(), "deep")


def test_weights_wider_than_the_synapse_are_refused():
    import dataclasses

    target = load_loihi2()
    wide = dataclasses.replace(target, limits={**target.limits, "weight_bits": 12})
    with pytest.raises(SpikecompileError, match="matrix layers.0.q_proj: .*weight_bits 12"):
        synapse_format("layers.0.q_proj", np.ones((2, 2)), wide)


def test_gain_is_a_24_bit_mantissa():
    value = gain(np.array([1 / 3, 12345.678]))
    mantissa, _ = np.frexp(value)
    assert np.array_equal(np.ldexp(mantissa, 24), np.rint(np.ldexp(mantissa, 24)))
    assert np.allclose(value, [1 / 3, 12345.678], rtol=2 ** -24)


def step_through(u: torch.Tensor, site, signed: bool = False) -> tuple:
    """The integer neuron stepped t by t, as Lava's fixed_pt process model runs it: the golden model of fire()."""
    sign, residual = (torch.ones_like(u), u.clone()) if signed else (torch.sign(u), u.abs())
    code, count = torch.zeros_like(u), torch.zeros_like(u)
    per_step = torch.zeros(len(site.threshold), dtype=torch.int64)
    for t, (threshold, reset, payload) in enumerate(zip(site.threshold.tolist(), site.reset.tolist(),
                                                        site.payload.tolist())):
        digits = (residual > threshold).long() - ((-residual > threshold).long() if signed else 0)
        if site.max_spikes:
            digits *= (count < site.max_spikes).long()
        residual, count, code = residual - reset * digits, count + digits.abs(), code + payload * digits
        per_step[t] = digits.abs().sum()
    return sign * code, count, residual, per_step


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("budget", [0, 3])
def test_fire_by_intervals_equals_stepping_the_integer_neuron(budget, signed):
    """fire() looks each potential up in its site's interval table; every code, count, residual and per-step count
    equals stepping the neuron, on random potentials, every interval edge ±1 and the saturation limits, for fitted-
    looking (non base-2) and base-2 grids."""
    generator = torch.Generator().manual_seed(budget)
    two_grains = torch.arange(8) // 4
    for genotype, d, h, theta in ((torch.zeros(8, dtype=torch.int64), [2.0], [2.0], [2.0]),
                                  (two_grains, [2.3, 1.7], [2.2, 1.8], [2.5, 1.6]),
                                  (two_grains, [1.6, 2.4], [1.5, 2.6], [1.4, 2.1]),
                                  (two_grains, [2.0, 1.8], [2.0, 1.9], [0.2, 0.3])):  # θ(t) < v0: r = 0 fires
        params = PhaseNeuronParams(tau=torch.tensor(1.7), genotype=genotype, d=torch.tensor(d), h=torch.tensor(h),
                                   theta=torch.tensor(theta), max_spikes=torch.tensor(budget), signed_digits=signed)
        site = site_format(params, load_loihi2(), "s")
        table = firing_table(site)
        edges = torch.cat([table.low + offset for offset in (-1, 0, 1)])
        u = torch.cat([torch.randint(-site.limit, site.limit + 1, (20000,), generator=generator), edges, -edges,
                       torch.tensor([0, site.limit, -site.limit])]).clamp(-site.limit, site.limit)
        code, interval = fire(u.double(), table)
        found = (code.long(), table.count[interval], (u if signed else u.abs()) - table.reset_sum[interval],
                 torch.bincount(interval, minlength=len(table.low)) @ table.pattern)
        for found, expected in zip(found, step_through(u, site, signed)):
            assert torch.equal(found, expected)
        assert len(table.low) <= (3 ** 8 if signed else 2 * 2 ** 8 + 1) and table.count.max() <= (budget or 8)


@pytest.mark.skipif(not kernel.available(), reason="no C++ compiler: the fused kernel is not built")
def test_fused_fixed_point_neuron_equals_its_torch_path():
    """neuron.kernel.fire_fixed (one pass) gives the torch path's values, codes, intervals and saturation count bit
    for bit: per-row gains and one gain, values that saturate both ways, halves that round to even, NaN-free."""
    params = PhaseNeuronParams(tau=torch.tensor(1.3), genotype=torch.arange(8) // 4, d=torch.tensor([2.2, 1.9]),
                               h=torch.tensor([2.1, 1.9]), theta=torch.tensor([2.4, 1.7]))
    site = site_format(params, load_loihi2(), "s")
    table = firing_table(site)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 40, dtype=torch.float64, generator=generator) * site.limit / 3
    x[0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 3.0 * site.limit])
    edges = torch.cat([table.low + offset for offset in (-1.0, -0.5, 0.0, 0.5, 1.0)]).clamp(-site.limit, site.limit)
    for x, g in ((x, torch.rand(40, dtype=torch.float64, generator=generator) * 2), (x, 0.75), (edges, 1.0)):
        fused = kernel.fire_fixed(x, g, site.limit, table.low, table.code, site.delta, intervals=True)
        torch_path = integrate_and_fire(x, g, site, table)
        assert fused[3] == torch_path[3] and (fused[3] > 0) == (x is not edges)
        for found, expected in zip(fused[:3], torch_path[:3]):
            assert torch.equal(found, expected)


@pytest.mark.skipif(not kernel.available(), reason="no C++ compiler: the fused kernel is not built")
def test_fused_neuron_digit_planes_int32_sums_and_in_place_values():
    """The fast path of the fixed-point run: fire_fixed's int8 digit planes are the signed digits of the torch path's
    codes, int32 window sums fire as their float64 values do, no values when none are asked for, and values written
    over x equal fresh ones; T = 8, and T = 16, whose narrowest intervals are narrower than a bucket."""
    from spikecompile.passes.fixed_point import digit_count, signed_digits

    for steps in (8, 16):
        params = PhaseNeuronParams(tau=torch.tensor(1.3), genotype=torch.arange(steps) // (steps // 2),
                                   d=torch.tensor([2.2, 1.9]), h=torch.tensor([2.1, 1.9]), theta=torch.tensor([2.4, 1.7]))
        site = site_format(params, load_loihi2(), "s")
        table = firing_table(site)
        digits = signed_digits(table.code, digit_count(float(table.code.abs().max())))
        sums = torch.randint(-site.limit, site.limit + 1, (5, 33, 40), dtype=torch.int32,
                             generator=torch.Generator().manual_seed(2)) // 2
        g = torch.rand(40, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
        value, code, _, saturated = integrate_and_fire(sums.double(), g, site, table)
        for x in (sums, sums.double()):
            fused = kernel.fire_fixed(x, g, site.limit, table.low, table.code, site.delta, code_digits=digits)
            assert torch.equal(fused[0], value) and fused[3] == saturated > 0
            assert torch.equal(fused[1], signed_digits(code, len(digits)))
        assert kernel.fire_fixed(sums, g, site.limit, table.low, table.code, site.delta, code_digits=digits,
                                 values=False)[0] is None
        x = sums.double()
        fused = kernel.fire_fixed(x, g, site.limit, table.low, table.code, site.delta, code_digits=digits,
                                  in_place=True)
        assert fused[0] is x and torch.equal(x, value)
    # a table with up to 40 intervals in one bucket of the 2^16 (as T ≥ 16 or a fine grid gives)
    limit = 2 ** 23 - 1
    low = torch.cat([torch.tensor([-limit]), torch.arange(-3000, 3000, 7), torch.tensor([40_000, 5_000_000])]).double()
    dense = FiringTable(low, torch.arange(len(low)).double() - 400, *(torch.zeros(len(low), dtype=torch.int64),) * 2,
                        torch.zeros(len(low), 8, dtype=torch.int64))
    assert kernel.bucket_table(low, limit)[0].diff().max() >= 30
    x = torch.cat([torch.arange(-3500.0, 3500.0, 0.5), torch.randn(5000, dtype=torch.float64) * limit]).reshape(-1, 19)
    fused = kernel.fire_fixed(x, 1.0, limit, low, dense.code, 0.25, intervals=True)
    torch_path = integrate_and_fire(x, 1.0, SimpleNamespace(limit=limit, delta=0.25), dense)
    assert all(torch.equal(found, expected) for found, expected in zip(fused[:3], torch_path[:3]))


def test_fixed_point_mode_tracks_the_float_model(built):
    ids = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(1))
    formats = deployed_formats(built.graph, built.store)
    fixed = run_fixed(built.graph, built.store, ids, formats)
    floating = output_of(built.graph, run(built.graph, built.store, ids, "decoded")).double()
    assert float((fixed.output(built.graph) - floating).abs().max() / floating.abs().max()) < 0.1
    assert sum(fixed.saturated.values()) == 0
    assert all(counts.max() <= len(formats.sites[name].threshold) for name, counts in fixed.counts.items())


def test_fast_run_equals_the_recorded_run(built):
    """run_fixed without records (int8 digit planes into the integer GEMMs, int32 sums into the fused neuron, values
    only where an op reads them, some written over their input) gives the recorded run's output, saturations and
    accumulator tallies bit for bit."""
    ids = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(4))
    formats = deployed_formats(built.graph, built.store)
    fast = run_fixed(built.graph, built.store, ids, formats, records=False)
    recorded = run_fixed(built.graph, built.store, ids, formats)
    assert torch.equal(fast.output(built.graph), recorded.output(built.graph))
    assert (fast.saturated, fast.overflowed, fast.peaks, fast.sizes) == \
        (recorded.saturated, recorded.overflowed, recorded.peaks, recorded.sizes)
    assert len(fast.values) < len(recorded.values) / 4  # values freed after their last reader


def test_sim_numerics_loihi2_through_the_cli(built, tmp_path):
    out = tmp_path / "sim"
    result = CliRunner().invoke(cli, ["build", built.model_path, "--target", "sim", "-o", str(out), "--numerics",
                                      "loihi2", "--windows", "1", "--seqlen", "16", "--mode", "decoded",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "Loihi 2 fixed point" in result.output and "ratio" in result.output


# ---- Lava fixed_pt against the simulator, bit for bit ---------------------------------------------------------------

def run_emitted(folder, tag: str = "fixed_pt", timeout: int = 300) -> dict:
    """Run the emitted run.py in a fresh interpreter where torch and spikecompile cannot be imported (lava sets the
    multiprocessing start method for the whole process); its result.npz as {key: array}."""
    code = ("import sys, runpy; sys.modules['torch'] = sys.modules['spikecompile'] = None;"
            f"sys.argv = ['run.py', '--tag', '{tag}', '--output', 'result-{tag}.npz'];"
            "runpy.run_path('run.py', run_name='__main__')")
    subprocess.run([sys.executable, "-c", code], cwd=folder, check=True, timeout=timeout, capture_output=True)
    with np.load(Path(folder) / f"result-{tag}.npz") as result:
        return dict(result)


def disagreements(result, folder, parts: dict, tokens: int = 4, timeout: int = 300) -> dict:
    """Run the emitted program in `folder` (Lava fixed_pt) and the fixed-point simulator on the same input; count
    what differs: spikes (Σ|Δcount|), integer potentials u, final residuals r, output elements."""
    lava = run_emitted(folder, timeout=timeout)
    part, feeds, _ = select_part(result.graph, parts.get("layers"), parts.get("block"))
    fraction_bits = json.loads((Path(folder) / "network.json").read_text())["payload_fraction_bits"]
    sim = run_fixed(part, result.store, example_inputs(result.graph, result.store, feeds, tokens, 0),
                    deployed_formats(part, result.store, None, fraction_bits))
    by_site = {part[name].site: name for name in sim.counts}
    (output,) = [value for key, value in lava.items() if key.startswith("output:")]
    expected = sim.output(part).numpy()
    return {"spikes": sum(int(np.abs(lava[f"counts:{site}"] - sim.counts[name].numpy()).sum())
                          for site, name in by_site.items()),
            "potentials": sum(int((lava[f"potential:{site}"] != sim.potentials[name].numpy()).sum())
                              for site, name in by_site.items()),
            "residuals": sum(int((lava[f"residual:{site}"] != sim.residuals[name].numpy()).sum())
                             for site, name in by_site.items()),
            "outputs": int((output.reshape(expected.shape) != expected).sum()),
            "saturated": sum(int(lava[f"saturated:{site}"]) != sim.saturated[name] for site, name in by_site.items()),
            "spike_total": sum(int(lava[f"counts:{site}"].sum()) for site in by_site),
            "steps": int(lava["steps"]), "steps_per_second": float(lava["steps_per_second"]),
            "seconds": float(lava["seconds:total"])}


EXACT = {"spikes": 0, "potentials": 0, "residuals": 0, "outputs": 0, "saturated": 0}


def exact_part(found: dict) -> dict:
    return {key: found[key] for key in EXACT}


# The tiny model's blocks and whole model, with and without the coding zoo: tests/test_lava.py
# (test_fixed_pt_equals_the_fixed_point_simulator_bit_for_bit), on the programs it emits once.


# ---- SmolLM2 (slow) ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.smollm2
@requires_smollm2
@requires_lava
@pytest.mark.parametrize("parts", [{"layers": [0], "block": "attn"}, {"layers": [0], "block": "mlp"},
                                   {"layers": [0, 1]}], ids=["attn", "mlp", "two-layers"])
def test_smollm2_lava_fixed_pt_equals_the_fixed_point_simulator(smollm2_t8_path, tmp_path, parts):
    smollm2 = build(smollm2_t8_path, BuildOptions())
    start = time.perf_counter()
    build_lava(smollm2, tmp_path / "program", tokens=4, **parts)
    found = disagreements(smollm2, tmp_path / "program", parts, timeout=3000)
    print(f"SmolLM2 {parts}: {found['steps']} steps, {found['spike_total']} spikes, wall "
          f"{time.perf_counter() - start:.1f} s (Lava run {found['seconds']:.1f} s, {found['steps_per_second']:.2f} "
          f"steps/s), disagreements {exact_part(found)}")
    assert exact_part(found) == EXACT and found["spike_total"] > 0


@pytest.mark.parametrize("code_peak, weight_bits, dtype", [(100, 8, torch.int32), (3000, 8, torch.int32),
                                                           (40000, 8, torch.float64), (3000, 12, torch.int32),
                                                           (2 ** 22, 12, torch.float64)])
@pytest.mark.parametrize("int8_gemm", [True, False])
def test_integer_synapse_sums_are_exact(code_peak, weight_bits, dtype, int8_gemm, monkeypatch):
    """synapse_sums (int8 digit GEMMs through torch._int_mm where it is the faster here, else float32 GEMMs of the same
    digits; recombined in int32 when a bound allows, else float64) equals 2m @ c in int64: one to three code digits,
    8- and 12-bit mantissas, a bound past int32 (float64), no rows, either GEMM, and with torch._int_mm refusing."""
    from spikecompile.passes import fixed_point
    from spikecompile.passes.fixed_point import IntegerWeights, digit_count, signed_digits, synapse_sums

    monkeypatch.setattr(fixed_point, "int8_gemm_is_fast", lambda: int8_gemm)

    generator = torch.Generator().manual_seed(code_peak)
    limit = 2 ** (weight_bits - 1)
    mantissa = torch.randint(-limit, limit, (40, 96), generator=generator)
    mantissa[0, :] = -limit  # the widest row
    codes = torch.randint(-code_peak, code_peak + 1, (2, 7, 96), generator=generator)
    codes[0, 0, :] = code_peak
    expected = codes @ (2 * mantissa).T
    weights = IntegerWeights.of(mantissa.numpy().astype(np.int8 if weight_bits <= 8 else np.int32))
    planes = signed_digits(codes.double(), digit_count(code_peak))
    assert torch.equal((planes.long() * 256 ** torch.arange(len(planes)).reshape(-1, 1, 1, 1)).sum(0), codes)
    peaks = tuple(int(peak) for peak in planes.long().abs().flatten(1).amax(-1))
    found = synapse_sums(planes, peaks, weights)
    assert found.dtype == dtype  # int32 where every partial sum provably fits it
    assert torch.equal(found.long(), expected)
    assert synapse_sums(planes[:, :0], peaks, weights).shape == (0, 7, 40)

    def refuse(a, b):
        raise RuntimeError("no int8 GEMM here")
    monkeypatch.setattr(torch, "_int_mm", refuse)
    assert torch.equal(synapse_sums(planes, peaks, weights).long(), expected)


def test_int8_products_past_float32_are_float64():
    """_int_mm's float fallback: float32 only while every partial sum is below 2^24 (then exact), float64 past it,
    the same integers as int64 arithmetic either way."""
    from spikecompile.passes.fixed_point import _int_mm, int8_gemm_is_fast

    a = torch.full((3, 1100), 127, dtype=torch.int8)  # 1100·127·127 > 2^24: float32 would round the sum
    b = torch.full((1100, 2), 127, dtype=torch.int8)
    b[0, 1] = -128
    expected = a.long() @ b.long()
    assert torch.equal(_int_mm(a, b, peak=1100 * 127 * 128).long(), expected)
    if not int8_gemm_is_fast():
        assert _int_mm(a, b, peak=1100 * 127 * 128).dtype == torch.float64
        assert _int_mm(a[:, :8], b[:8], peak=8 * 127 * 128).dtype == torch.float32
    assert int8_gemm_is_fast() in (True, False) and int8_gemm_is_fast() is int8_gemm_is_fast()  # timed once
