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
    """(d(t), h(t), θ(t), θ'(t) = θ(t) − v0) as float32 arrays, in neuron.magnitude_spikes' arithmetic."""
    params = _params_of(neuron)
    d, reset, theta = (values.numpy() for values in step_schedule(params))
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
    return max(params.T, ratio.denominator.bit_length() - 1 if power_of_two else params.T + 1)


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
