"""SimRun: what one simulated sequence leaves behind — the counts the ledger prices and the site activity."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .counts import Counts


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
