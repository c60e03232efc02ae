"""What a simulation leaves behind: the operation and memory-traffic counts the energy ledger prices (docs/method.md §7)
and SimRun, one simulated sequence's counts per node with its site activity.

One Counts per node per run (a sequence of L tokens, batch 1), for the SNN (event semantics) and for its ANN
counterpart (the same node computed once on real values). The counting convention — which op is a MAC or an
AC, what a read or write is — is CONVENTION below; backends.sim.counting applies it node by node.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from torch import Tensor

CONVENTION = """\
Counting convention (per sequence of L tokens, batch 1; SNN under the event rules of docs/method.md §3):
* AC (accumulate, 32-bit add): one per spike per fan-out target — a binary spike selects a weight (Linear) or a
  running-sum entry (spike-operand matmuls, ⊙) and adds it; also every real-valued add (residual adds, running
  sums of real inputs, the differential rule's subtraction, a neuron integrating its input steps).
* MAC (32-bit multiply-accumulate): every real-valued product — dense matmuls with a real operand, RMSNorm,
  softmax and SiLU evaluations (MAC-equivalents per element: rmsnorm 2, softmax 3, silu 3), RoPE (2 per
  element), ⊙ with a real operand, online Hadamard rotations (a + K per element for n = 2^a·K as its
  construction splits n; K = 1: a), and the receiver-side per-step gain: the weight d(t) of step t is applied
  once per output element per step (one MAC per output per step and spiking operand).
* A ternary spike (sign × {0, 1}) costs what a binary one does: one event, 1 bit; its sign selects add/subtract.
* Neuron state: one neuron step per neuron per fire step (read v, compare with θ(t), subtract h(t), write v).
* Per-token scales (sdllm --sdllm-scales per-token), per row of N neurons: N compares for max|x| (as adds), one
  reciprocal (6 MAC-equivalents, an estimate), N MACs for x·(1/τ_row) and T for the step gains τ_row·d(t).
* Memory: SNN — each AC reads one 32-bit word (the weight or running-sum entry) plus the 1-bit spike that drives
  it; real-valued ops read two 32-bit words per MAC; every real output written per step is a 32-bit write,
  every spike a 1-bit write. ANN — two 32-bit reads per MAC or add, one 32-bit write per output element.
* int8 ANN (priced where the target gives mac_int8 and read_int8): the same ANN counts, with every matmul MAC
  (Linear, QKᵀ, P·V: weight × activation or activation × activation) an 8-bit integer MAC into a 32-bit sum and
  its two operand reads 8-bit (W8A8); norms, softmax, SiLU, RoPE, rotations, ⊙, adds and every write stay 32-bit.
* Attention: "causal" counts only the query-key pairs a causal mask keeps (and the prefix keys); "full"
  counts every pair (hardware that computes the whole score matrix and masks it).
"""


@dataclass
class Counts:
    """Counts of one node (or a sum of nodes) for one run. All values are counts of events, not energies."""

    mac: float = 0.0
    """real-valued multiply-accumulates (32-bit)"""
    ac: float = 0.0
    """accumulates: spike-driven synaptic ops and real-valued adds (32-bit)"""
    neuron_steps: float = 0.0
    """neuron updates: one neuron, one fire step"""
    reads: float = 0.0
    """32-bit words read (weights, running sums, real activations)"""
    spike_reads: float = 0.0
    """1-bit spike reads"""
    writes: float = 0.0
    """32-bit words written (real outputs, running sums)"""
    spike_writes: float = 0.0
    """1-bit spike writes (one per spike emitted)"""
    int8_mac: float = 0.0
    """ANN only: of `mac`, the matmul MACs (Linear, QKᵀ, P·V) an int8 (W8A8) ANN runs as 8-bit integer MACs,
    each with its two operand reads (2 of `reads`) 8-bit"""

    def __add__(self, other: Counts) -> Counts:
        return Counts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def scaled(self, factor: float) -> Counts:
        return Counts(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class SimRun:
    """One run of the simulator on a sequence of `tokens` tokens (batch 1).

    snn, ann: Counts per node (event semantics; the ANN counterpart computed once on real values)
    layers:   decoder layer of each node; None for the embedding, the final norm and lm_head
    sites:    per spike site {layer, kind, timesteps, elements, spikes_per_step: [T floats],
              firing_rate = Σ spikes / (elements·T)}
    logits:   the SNN's output logits, when kept
    """

    tokens: int
    snn: dict[str, Counts]
    ann: dict[str, Counts]
    layers: dict[str, int | None]
    sites: dict[str, dict]
    logits: Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"SimRun: tokens must be an int ≥ 1, got {self.tokens!r}")
        if set(self.snn) != set(self.ann):
            odd = sorted(set(self.snn) ^ set(self.ann))
            raise ValueError(f"SimRun: snn and ann must count the same nodes; {odd[0]} is in only one")
        unplaced = sorted(set(self.snn) - set(self.layers))
        if unplaced:
            raise ValueError(f"SimRun: node {unplaced[0]} has no entry in layers ({len(unplaced)} without)")


OUTSIDE_LAYERS = "other"
"""Label of what belongs to no decoder layer (embedding, final norm, lm_head)."""


def firing_rates(sites: dict[str, dict]) -> dict:
    """Firing rates pooled over sites: Σ spikes / Σ (elements·T), per site kind and layer, per kind, overall.

    {"overall": r, "by_kind": {kind: r}, "by_layer": {kind: {layer label: r}}, "layers": [labels in order]}.
    """
    pools: dict[tuple, list[float]] = {}
    for entry in sites.values():
        layer = OUTSIDE_LAYERS if entry["layer"] is None else str(entry["layer"])
        spikes, slots = float(sum(entry["spikes_per_step"])), float(entry["elements"]) * entry["timesteps"]
        for key in ((), (entry["kind"],), (entry["kind"], layer)):
            pool = pools.setdefault(key, [0.0, 0.0])
            pool[0] += spikes
            pool[1] += slots
    rate = {key: spikes / slots if slots else 0.0 for key, (spikes, slots) in pools.items()}
    kinds = sorted(key[0] for key in pools if len(key) == 1)
    layers = sorted({key[1] for key in pools if len(key) == 2},
                    key=lambda label: (label == OUTSIDE_LAYERS, int(label) if label.isdigit() else 0))
    return {"overall": rate.get((), 0.0), "by_kind": {kind: rate[(kind,)] for kind in kinds},
            "by_layer": {kind: {layer: rate[(kind, layer)] for layer in layers if (kind, layer) in rate}
                         for kind in kinds},
            "layers": layers}


def rates_by_kind(run: SimRun) -> dict[str, float]:
    """Each site kind's firing rate over a run, all layers together: Σ spikes / Σ (elements·T) (firing_rates)."""
    return firing_rates(run.sites)["by_kind"]
