"""The phase neuron, the ground floor every other layer builds on (equations in reference.py).

    reference   the neuron in pure PyTorch: parameters, schedules, encode/decode/quantize, the golden base-2 model
    kernel.cpp  the same neuron fused into one pass (C++/OpenMP), shipped as package data
    kernel      builds kernel.cpp once with the system compiler, loads it and runs it (eager fallback)

phase_encode and phase_quantize dispatch: the kernel wherever it applies (inference on CPU float tensors),
the reference otherwise (autograd, other devices, another spike function); both give the same bits, for the
unsigned and the signed-digit neuron alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernel, reference
from .reference import (
    Fire, PhaseNeuronParams, base2_params, even_genotype, fire_heaviside, golden_base2, golden_signed_base2,
    initial_potential, magnitude_spikes, mask_late_spikes, naf_boundaries, phase_decode, signed_base2_params,
    signed_spikes, step_schedule, token_scales, weighted_spike_sum,
)

__all__ = [
    "Fire", "PhaseNeuronParams", "base2_params", "even_genotype", "fire_heaviside", "golden_base2",
    "initial_potential", "magnitude_spikes", "mask_late_spikes", "phase_decode", "phase_encode", "phase_quantize",
    "step_schedule", "weighted_spike_sum", "firing_rate", "golden_signed_base2", "naf_boundaries",
    "signed_base2_params", "signed_spikes", "token_scales", "kernel", "reference",
]


def phase_encode(x: Tensor, params: PhaseNeuronParams) -> tuple[Tensor, Tensor]:
    """Spike mode: (σ as int8 like x, spikes as bool [T, *x.shape])."""
    if kernel.applies(x, params):
        return torch.sign(x).to(torch.int8), kernel.fire(x, params, out=False, spikes=True).spikes
    return reference.phase_encode(x, params)


def firing_rate(x: Tensor, params: PhaseNeuronParams) -> float:
    """Spikes per neuron per step on the inputs x: mean over t and the elements of |s_t| (phase_encode's spikes;
    a signed digit −1 is one spike)."""
    _, spikes = phase_encode(x.float(), params)
    return float(spikes.float().abs().mean())


def phase_quantize(x: Tensor, params: PhaseNeuronParams, fire: Fire = fire_heaviside) -> Tensor:
    """Decoded mode: x̂, bitwise equal to phase_decode(*phase_encode(x)) without storing the T spike planes.
    Without gradients and with the Heaviside fire, the fused kernel computes it, bitwise equal."""
    if fire is fire_heaviside and kernel.applies(x, params):
        return kernel.quantize(x, params)
    return reference.phase_quantize(x, params, fire)
