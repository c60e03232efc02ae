"""The Loihi 2 target: its limits and systems (targets/loihi2.toml) and the fixed-point formats that the mapping
pass (passes.loihi_mapping) checks a model against and the Lava backend (backends.lava) emits.

    weights     W ≈ m·2^e: one exponent e per matrix, a signed b-bit mantissa m (weight_exponent, quantize_weights)
    synapses    Σ_j 2m_ij·σ_j s_j, an exact integer bounded by 2·Σ_j |m_ij| (accumulator_peak)
    potentials  integers in units of τ·2^-F on the s-bit state with g guard bits (potential_level,
                potential_exponent, grid_bits)
    budget      a per-neuron spike count 0..K of ⌈log2(K + 1)⌉ bits for a budget 1 ≤ K < T (budget_counter_bits)

Derivations and sources: docs/loihi2.md. A neuron argument is one site's PhaseNeuronParams, or anything that
offers them through .params() (the IR's PhaseNeuron), so this ground-floor module needs no IR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import numpy as np

from ..checks import is_count
from ..errors import SpikecompileError
from ..neuron import PhaseNeuronParams, step_schedule
from .files import packaged_target, parse_target, read_target_file

LIMITS = ("cores_per_chip", "neurons_per_core", "synapse_memory_per_core", "axons_in_per_core", "axons_out_per_core",
          "synapses_per_chip", "weight_bits", "state_bits", "accumulator_bits", "payload_bits")
"""The [limits.<name>] tables targets/loihi2.toml must give (each with value, unit and source)."""

SPIKE_PAYLOAD_BITS = 2
"""bits (2-bit graded payload) of one spike message: it carries σ ∈ {−1, +1}, d(t) being a receiver-side gain.
Source: the Lava backend's encoding (backends/lava/emit.py); checked against [limits.payload_bits]."""


@dataclass(frozen=True)
class Loihi2:
    """A loaded targets/loihi2.toml: limits and systems (chips) by name, with their sources."""

    file: str
    limits: dict[str, int]
    guard_bits: int
    systems: dict[str, int]
    sources: dict[str, str]


class HasNeuron(Protocol):
    """What offers one site's neuron parameters: the IR's PhaseNeuron."""

    def params(self) -> PhaseNeuronParams: ...


Neuron = PhaseNeuronParams | HasNeuron


def load_loihi2(path: str | Path | None = None) -> Loihi2:
    """targets/loihi2.toml (packaged) or the file at `path`; SpikecompileError naming the file and field."""
    label, text = packaged_target("loihi2.toml") if path is None else read_target_file(path, "the Loihi 2 target")
    document = parse_target(label, text)
    tables = {**{f"limits.{name}": entry for name, entry in document.get("limits", {}).items()},
              **{f"fixed_point.{name}": entry for name, entry in document.get("fixed_point", {}).items()}}
    for name in (*(f"limits.{limit}" for limit in LIMITS), "fixed_point.guard_bits"):
        entry = tables.get(name)
        if not isinstance(entry, dict) or not is_count(entry.get("value"), 0) or not entry.get("unit") \
                or not entry.get("source"):
            raise SpikecompileError(f"{label}: [{name}] must give an integer value ≥ 0, a unit and a source")
    systems = document.get("systems", {})
    if not systems or not all(isinstance(entry, dict) and is_count(entry.get("chips"), 1) and entry.get("source")
                              for entry in systems.values()):
        raise SpikecompileError(f"{label}: [systems.<name>] tables must give chips (an integer ≥ 1) and a source")
    return Loihi2(label, {name: tables[f"limits.{name}"]["value"] for name in LIMITS},
                  tables["fixed_point.guard_bits"]["value"], {name: entry["chips"] for name, entry in systems.items()},
                  {name: entry["source"] for name, entry in {**tables, **systems}.items()})


# ---- weights and synapse sums ---------------------------------------------------------------------------------------

def weight_exponent(max_abs: float, bits: int) -> int:
    """e = ⌈log2(max|W| / (2^(b−1) − 1))⌉ (0 for an all-zero matrix)."""
    return math.ceil(math.log2(max_abs / (2 ** (bits - 1) - 1))) if max_abs > 0 else 0


def quantize_weights(weights: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """(m, e) with W ≈ m·2^e: m int8 (int32 above 8 bits), e the shared exponent."""
    exponent = weight_exponent(float(np.abs(weights).max(initial=0.0)), bits)
    limit = 2 ** (bits - 1)
    mantissa = np.clip(np.rint(np.asarray(weights, dtype=np.float64) * 2.0 ** -exponent), -limit, limit - 1)
    return mantissa.astype(np.int8 if bits <= 8 else np.int32), exponent


def accumulator_peak(mantissa: np.ndarray) -> int:
    """The largest |Σ_j 2m_ij·σ_j s_j| any ternary spike vector can give: max_i 2·Σ_j |m_ij|."""
    return int(2 * np.abs(mantissa.astype(np.int64)).sum(axis=-1).max(initial=0))


# ---- potentials, thresholds and spike budgets -------------------------------------------------------------------

def _params_of(neuron: Neuron) -> PhaseNeuronParams:
    return neuron if isinstance(neuron, PhaseNeuronParams) else neuron.params()


def residual_schedule(neuron: Neuron) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(d(t), h(t), θ(t), θ'(t) = θ(t) − v0) as float32 arrays, in neuron.magnitude_spikes' arithmetic; for a
    signed-digit neuron θ'(t) = θ_sd(t), its threshold against |r| (neuron.signed_spikes' arithmetic)."""
    params = _params_of(neuron)
    d, reset, theta = (values.numpy() for values in step_schedule(params))
    if params.signed_digits:
        return d, reset, theta, params.signed_thresholds().numpy()
    return d, reset, theta, theta - params.v0.numpy()


def potential_level(neuron: Neuron) -> float:
    """V of the site's potential grid (docs/loihi2.md): the largest magnitude its state holds, before the guard
    bits — the all-fire level Σ_t h(t) + max_t θ'(t), the largest |θ'(t)| and the deepest residual
    max_t (h(t) − θ'(t)), whatever the sign and size of v0."""
    _, reset, _, threshold = (values.astype(np.float64) for values in residual_schedule(neuron))
    all_fire = float(np.sum(reset) + np.max(threshold))
    return max(all_fire, float(np.max(np.abs(threshold))), float(np.max(reset - threshold)))


def potential_exponent(neuron: Neuron, state_bits: int, guard_bits: int) -> int:
    """F of the site's potential grid: the largest integer with 2^g·V·2^F/τ ≤ 2^(s−1) − 1 (docs/loihi2.md)."""
    params = _params_of(neuron)
    level = potential_level(params)
    return math.floor(math.log2((2 ** (state_bits - 1) - 1) * float(params.tau) / (2 ** guard_bits * level)))


def grid_bits(neuron: Neuron) -> int:
    """The fractional bits F needs for θ'(t) = θ(t) − v0 to be integers of the grid when the bases are 2: T for
    θ(t) = τ·2^-(t+1), f for v0 = k·τ·2^-f (k odd; T + 1 for the phase coding's ½·τ·2^-T, and for a v0 that is no
    such multiple of τ, as the default's half LSB)."""
    params = _params_of(neuron)
    ratio = Fraction(float(params.v0)) / Fraction(float(params.tau))
    power_of_two = ratio.denominator & (ratio.denominator - 1) == 0
    bits = max(params.T, ratio.denominator.bit_length() - 1 if power_of_two else params.T + 1)
    return max(bits, params.T + 1) if params.signed_digits else bits  # θ_sd(t) = (M_t + ½)·τ·2^-T


def budget_counter_bits(neuron: Neuron) -> int:
    """Bits of the site's per-neuron spike counter (docs/loihi2.md): ⌈log2(K + 1)⌉ for a budget 1 ≤ K < T, else 0."""
    params = _params_of(neuron)
    budget = int(params.max_spikes)
    return math.ceil(math.log2(budget + 1)) if 0 < budget < params.T else 0


def flip_level(neuron: Neuron) -> float:
    """The largest jump of the site's output x̂(x) = σ·Σ_t d(t)·s_t at a discontinuity: between the outputs of
    adjacent magnitude intervals (the spike patterns of magnitudes m, enumerated as a decision tree whose cuts
    θ'(t) + Σ_{u<t} h(u)·s_u may have either sign, a branch that has spent its budget K staying quiet), and across
    x = 0, 2·x̂(0+) (nonzero only where some θ'(t) < 0: a large v0). What an input moved across one threshold
    changes (the Lava backend's flip allowance); cuts in float64."""
    params = _params_of(neuron)
    if params.signed_digits:
        return _signed_flip_level(params)
    d, reset, _, threshold = (values.astype(np.float64) for values in residual_schedule(params))
    budget = int(params.max_spikes)
    low, high = np.zeros(1), np.array([2.0 * potential_level(params)])  # above V the pattern no longer changes
    resets, spent, values = np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros(1)
    for t in range(params.T):
        cut = threshold[t] + resets
        if budget:
            cut = np.where(spent < budget, cut, np.inf)
        quiet_high, firing_low = np.minimum(high, cut), np.maximum(low, cut)
        quiet, firing = quiet_high > low, high > firing_low
        low, high = np.concatenate([low[quiet], firing_low[firing]]), np.concatenate([quiet_high[quiet], high[firing]])
        resets = np.concatenate([resets[quiet], resets[firing] + reset[t]])
        spent = np.concatenate([spent[quiet], spent[firing] + 1])
        values = np.concatenate([values[quiet], values[firing] + d[t]])
    values = values[np.argsort(low, kind="stable")]
    return float(max(np.max(np.abs(np.diff(values)), initial=0.0), 2.0 * values[0]))


def _signed_flip_level(params: PhaseNeuronParams) -> float:
    """flip_level of a signed-digit neuron: the intervals of x on [−2V, 2V] with one digit pattern, split at each
    step where r = x − R (R the resets so far) crosses ±θ_sd(t): s_t = −1 below the lower cut, +1 above the
    upper, 0 between (with θ_sd(t) < 0 both channels fire there and cancel); a branch that spent K stays 0."""
    d, reset, _, threshold = (values.astype(np.float64) for values in residual_schedule(params))
    budget = int(params.max_spikes)
    level = 2.0 * potential_level(params)
    low, high = np.array([-level]), np.array([level])
    resets, spent, values = np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros(1)
    for t in range(params.T):
        cuts = np.sort(np.stack([resets - threshold[t], resets + threshold[t]]), axis=0)
        if budget:
            cuts = np.where(spent < budget, cuts, np.array([[-np.inf], [np.inf]]))
        pieces = [(low, np.minimum(high, cuts[0]), -1), (np.maximum(low, cuts[0]), np.minimum(high, cuts[1]), 0),
                  (np.maximum(low, cuts[1]), high, 1)]
        kept = [(a, b, digit, b > a) for a, b, digit in pieces]
        low = np.concatenate([a[keep] for a, _, _, keep in kept])
        high = np.concatenate([b[keep] for _, b, _, keep in kept])
        resets = np.concatenate([resets[keep] + reset[t] * digit for _, _, digit, keep in kept])
        spent = np.concatenate([spent[keep] + abs(digit) for _, _, digit, keep in kept])
        values = np.concatenate([values[keep] + d[t] * digit for _, _, digit, keep in kept])
    values = values[np.argsort(low, kind="stable")]
    return float(np.max(np.abs(np.diff(values)), initial=0.0))


# ---- the deployed formats: one definition read by the mapping pass, the Lava emitter and the simulator ----------
#
# synapse  W_ij ≈ m_ij·s_i: a signed 8-bit mantissa (lava's mixed-sign synapse holds 2m, even values in [−256, 254])
#          and one scale per output row s_i = max_j|W_ij| / (2^(b−1) − 1), folded into the receiver's gain (Loihi 2's
#          synapse exponent is per matrix; a per-row factor costs nothing where the receiver multiplies anyway).
#          Step t's sum A_t = Σ_j 2m_ij·σ_j·D_t·s_j(t) is an exact integer on the accumulator_bits dendrite.
# spike    a graded payload σ·D_t (payload_bits, signed): D_t = d(t)/δ, the site's d(t) on an integer grid of δ.
# neuron   the window's input Σ_t A_t (or an op's integer message) times the gain g = G·2^-k (G a 24-bit mantissa),
#          rounded half to even onto the site's grid τ·2^-F and saturated at ±(2^(s−1) − 1); thresholds θ'(t) and
#          resets h(t) rounded onto the same grid; it then fires on integers.
# op       norms, softmax, SiLU, products, RoPE, rotations, head reshapes, adds: the host CPU in float64, once per
#          window on the window's values (decoded); its message to a neuron is rounded onto that neuron's grid.

SYNAPSE_MANTISSA_BITS = 8
"""The widest weight mantissa a synapse holds. Source: lava-nc 0.10.0 Dense/Sparse fixed_pt (clip_weights(num_bits=8),
truncate_weights: mixed sign, even values in [−256, 254], i.e. 2m with m a signed 8-bit mantissa)."""

GAIN_BITS = 24
"""bits of the receiver's gain mantissa G (g = G·2^-k). Source: spikecompile choice, the 24-bit neuron state width
(targets/loihi2.toml [limits.state_bits]); G·A stays below 2^53, so float64 computes it exactly."""

OP_FORMAT = {"where": "host CPU", "format": "float64",
             "source": "Loihi 2 neurocores run only synapses and neurons; norms, softmax, SiLU, activation products, "
                       "RoPE and rotations run on the embedded x86 cores or the host (Intel Loihi 2 brief, 2021); "
                       "float64 as lava-nc's PyLoihiProcessModels on CPU"}
"""Where and in which format every non-synaptic op runs (one format for all)."""


@dataclass(frozen=True)
class SynapseFormat:
    """One synapse matrix as deployed: mantissa m [out, in] (int8), per-row scale s_i (float64), limits."""

    name: str
    weight_bits: int
    mantissa: np.ndarray
    scale: np.ndarray
    accumulator_bits: int
    layout: str = "8-bit signed mantissa, lava holds 2m (even, [−256, 254]); one scale per output row, in the gain"

    def dequantized(self) -> np.ndarray:
        """m·s: the weights the deployed synapse realises (float64)."""
        return self.mantissa.astype(np.float64) * self.scale[:, None]


@dataclass(frozen=True)
class SiteFormat:
    """One spike site's neuron as deployed (all integers on the site's grid, unit τ·2^-F)."""

    site: str
    state_bits: int
    exponent: int
    unit: float
    threshold: np.ndarray
    reset: np.ndarray
    payload: np.ndarray
    delta: float
    payload_bits: int
    max_spikes: int
    signed_digits: bool = False
    """the signed-digit neuron: r = u keeps its sign, s_t = [r > θ'(t)] − [−r > θ'(t)] (θ'(t) = θ_sd(t))"""

    @property
    def limit(self) -> int:
        return 2 ** (self.state_bits - 1) - 1


def quantize_rows(weights: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(m int8, s float64 [rows]): m = clip(rint(W/s), −2^(b−1), 2^(b−1) − 1), s = max_j|W_ij|/(2^(b−1) − 1) (1 for a
    zero row). Reproduces conversion's --weight-bits RTN grid (symmetric, per output channel) exactly."""
    weights = np.asarray(weights, dtype=np.float64)
    top = 2 ** (bits - 1) - 1
    scale = np.abs(weights).max(axis=1, initial=0.0) / top
    scale = np.where(scale > 0, scale, 1.0)
    mantissa = np.clip(np.rint(weights / scale[:, None]), -top - 1, top)
    return mantissa.astype(np.int8 if bits <= 8 else np.int32), scale


def synapse_format(name: str, weights: np.ndarray, target: Loihi2) -> SynapseFormat:
    """The deployed format of the synapse matrix `name` (weights [out, in])."""
    bits = target.limits["weight_bits"]
    if not 2 <= bits <= SYNAPSE_MANTISSA_BITS:
        raise SpikecompileError(f"matrix {name}: {target.file} gives weight_bits {bits}; Loihi 2's mixed-sign synapse "
                                f"holds a 2- to {SYNAPSE_MANTISSA_BITS}-bit mantissa (lava clips 2m to [−256, 254])")
    mantissa, scale = quantize_rows(weights, bits)
    return SynapseFormat(name, bits, mantissa, scale, target.limits["accumulator_bits"])


PAYLOAD_FRACTION_BITS = 4
"""The most bits of δ below the site's smallest d(t) when its d(t) are no exact multiples of one step (learned
bases): D_t = rint(d(t)/δ), δ = min_t d(t)·2^-k, so each level is off by at most δ/2 = 2^-(k+1) of the smallest.
Source: spikecompile choice, trading the payload's precision against the accumulator's headroom (the window sums
grow with max_t D_t, 2^k): k = 4 unless calibration shows a synapse the site feeds would overflow
(passes.deployment.fit_payload_grids lowers k per site)."""


def payload_grid(d: np.ndarray, payload_bits: int, site: str,
                 fraction_bits: int = PAYLOAD_FRACTION_BITS) -> tuple[np.ndarray, float]:
    """(D_t integers, δ) with d(t) ≈ D_t·δ: δ = min_t d(t)·2^-k for the smallest k ≤ fraction_bits that makes
    every D_t an integer (exact: base-2 levels), else k = fraction_bits and D_t rounded; SpikecompileError
    naming the site when max_t D_t does not fit a signed payload_bits-bit graded payload."""
    d = np.asarray(d, dtype=np.float64)
    top = 2 ** (payload_bits - 1) - 1
    smallest = float(d[d > 0].min()) if (d > 0).any() else 1.0
    for shift in range(fraction_bits + 1):
        delta = smallest * 2.0 ** -shift
        levels = np.rint(d / delta)
        if np.array_equal(levels, d / delta) or shift == fraction_bits:
            break
    if levels.max() > top:
        raise SpikecompileError(
            f"site {site}: its output levels d(t) span max/min = {d.max() / smallest:.4g}, more than a "
            f"{payload_bits}-bit graded payload holds at T = {len(d)}; lower T or narrow the site's bases")
    return levels.astype(np.int64), delta


def site_format(neuron: Neuron, target: Loihi2, site: str = "",
                fraction_bits: int = PAYLOAD_FRACTION_BITS) -> SiteFormat:
    """The deployed format of one site's neuron (payload_grid with at most `fraction_bits`); SpikecompileError naming
    the site when its grid cannot hold the thresholds it needs (grid_bits) or its d(t) (payload_grid)."""
    params = _params_of(neuron)
    site = site or getattr(neuron, "site", "") or "?"
    state_bits = target.limits["state_bits"]
    exponent = potential_exponent(params, state_bits, target.guard_bits)
    d, reset, theta, _ = residual_schedule(params)
    unit = float(params.tau) * 2.0 ** -exponent
    if exponent < params.T:
        raise SpikecompileError(
            f"site {site}: the {state_bits}-bit potential leaves {exponent} fractional bits of τ, fewer than T = "
            f"{params.T}: its thresholds τ·2^-(t+1) are not on the grid; lower T or the site's level")
    payload, delta = payload_grid(d, target.limits["payload_bits"], site, fraction_bits)
    if params.signed_digits:  # θ_sd(t) onto the grid (exact with every base 2: (2M_t + 1)·τ·2^-(T+1))
        threshold = np.rint(params.signed_thresholds().double().numpy() / unit).astype(np.int64)
    else:
        threshold = np.rint((theta.astype(np.float64) - float(params.v0)) / unit).astype(np.int64)
    return SiteFormat(site, state_bits, exponent, unit, threshold,
                      np.rint(reset.astype(np.float64) / unit).astype(np.int64), payload, delta,
                      target.limits["payload_bits"], int(params.max_spikes), params.signed_digits)


def gain(value: np.ndarray | float) -> np.ndarray:
    """value rounded to a GAIN_BITS mantissa G·2^-k (per element): the receiver's gain as deployed (float64)."""
    value = np.asarray(value, dtype=np.float64)
    mantissa, exponent = np.frexp(value)
    return np.ldexp(np.rint(np.ldexp(mantissa, GAIN_BITS)), exponent - GAIN_BITS)


def synapse_gain(synapse: SynapseFormat, source: SiteFormat, receiver: SiteFormat | None) -> np.ndarray:
    """Per output row, what the receiver multiplies Σ_t A_t by: s_i·δ/2 (an op: the value W·x̂), or that over the
    receiving site's unit as a GAIN_BITS gain (a neuron: its grid)."""
    value = synapse.scale * (source.delta / 2.0)
    return value if receiver is None else gain(value / receiver.unit)


def window_peak(synapse: SynapseFormat, source: SiteFormat) -> int:
    """The largest |A_t| (one step's integer sum) any spike pattern can give: max_i 2·Σ_j|m_ij|·max_t D_t."""
    return accumulator_peak(synapse.mantissa) * int(source.payload.max())
