"""Run an IR graph in decoded or event mode, keeping every spike site's spike trains for the counters.

decoded  each node computes its decoded equation on whole tensors (ir.interpret's rules); a phase
         neuron encodes its input into spikes s_t and returns x̂ = σ·Σ_t d(t)·s_t.
event    every value is a stack of T per-step tensors [T, ...] whose sum is the decoded value, under the exact
         rules of docs/method.md §3 (each node's docstring): linear nodes map each step (a constant — bias,
         embedding row, prefix cache — enters at t = 0); nonlinear nodes emit f(X_t) − f(X_{t−1}) on running
         sums X_t; products of two activations emit S_A(t)·S_B(t) − S_A(t−1)·S_B(t−1) (docs/method.md's causal
         running-sum rule S_A(t)·B_t + A_t·S_B(t) − A_t·B_t, in one product per step); a phase neuron
         integrates its whole input window, then fires y_t = σ·d(t)·s_t for t = 0..T−1. Products and
         nonlinearities compute on running sums, so they keep them (RUNNING_RULES): a consumer that reads running
         sums takes them as they are, a neuron its window Σ_t x_t as their last step, and only a per-step
         consumer (a linear node) has the differences made — equal in exact arithmetic, and fewer passes over
         the [T, heads, S, S] attention stacks.

The two modes agree to float rounding: the neuron input is Σ_t x_t in event mode and x in decoded mode, so
a value within rounding of a threshold can fire differently — run in float64 to make that vanishingly rare.
Late-spike masking (mask_steps = m): a neuron keeps only its spikes at steps < t0 + m, t0 its first spike.

Neurons run in one fused pass (neuron.kernel: x̂ or the event planes, with the spike counts), bitwise the
reference neuron; the event rules' float operations are those the ONNX event form (backends.onnx) reproduces,
so both give the same spike planes bit for bit — change them together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from spikecompile.errors import SpikecompileError
from spikecompile.heap import keep_large_allocations
from spikecompile.ir import (
    ActivationMatmul, ElementwiseProduct, Embedding, Graph, IRNode, KVPrefix, Linear, Nonlinear, Output,
    PhaseNeuron, layer_of,
)
from spikecompile.ir.interpret import NONLINEAR_FUNCTIONS, RUNNERS, graph_inputs, neuron_of
from spikecompile.neuron import kernel, token_scales

from .counting import SpikeTally, structure

MODES = ("decoded", "event")
SPIKE_FORMS = ("planes", "tally")
"""How a Recording keeps each neuron's spikes: bool planes [T, *shape], or a SpikeTally (what the counters read)."""
HELD_BYTES = 1 << 30
"""run_windows: what a group of windows may hold between two layers. A window holds its residual stream there:
seq × d floats, T times in event mode (512 tokens of SmolLM2 at T = 8: 1.2 MB decoded, 9.4 MB event; of
LLaMA-2-7B: 8.4 MB and 67 MB), so 64 SmolLM2 windows are one group and a 7B model's are about 16 per group."""


@dataclasses.dataclass
class Recording:
    """One run: node values (event mode: [T, ...] per node; all of them, or with keep_values=False only the
    Outputs), each neuron's spikes (bool planes [T, ...], or with spikes="tally" a SpikeTally), and every node's
    decoded output shape."""

    values: dict[str, Tensor]
    spikes: dict[str, Tensor | SpikeTally]
    mode: str
    shapes: dict[str, tuple[int, ...]]
    stepped: frozenset
    """the nodes whose event values carry a leading step dim (all float values but the summed Outputs)"""


@torch.no_grad()
def run(graph: Graph, store, inputs: Tensor | dict[str, Tensor], mode: str = "decoded",
        mask_steps: int | None = None, keep_values: bool = True, spikes: str = "planes") -> Recording:
    """Run `graph` (every node's timesteps assigned) on `inputs` (token ids, or values by Input name).
    keep_values=False drops each value once its last consumer has run (event mode on a 512-token window of a
    real model would otherwise hold every node's T steps at once). spikes: keep each neuron's spikes as bool
    planes, or as a SpikeTally (totals per step and per position: all the counters read, without the T planes)."""
    execution = Execution(graph, store, inputs, mode, mask_steps, keep_values, spikes)
    execution.advance(structure(graph).order)
    return execution.recording()


class Execution:
    """One sequence's run of `graph`, resumable: advance(names) runs the next nodes of the topological order.
    `run` advances through the whole order at once; run_windows takes every window of a group through one decoder
    layer's nodes before the next layer's, reading each weight once for the group (SegmentReads). The same
    operations in the same order on each window either way: the same bits."""

    def __init__(self, graph: Graph, store, inputs: Tensor | dict[str, Tensor], mode: str = "decoded",
                 mask_steps: int | None = None, keep_values: bool = True, spikes: str = "planes"):
        if mode not in MODES:
            raise SpikecompileError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        if spikes not in SPIKE_FORMS:
            raise SpikecompileError(f"spikes {spikes!r}: choose one of {', '.join(SPIKE_FORMS)}")
        missing = [name for name in graph if graph[name].timesteps is None]
        if mode == "event" and missing:
            raise SpikecompileError(f"node {missing[0]}: no timesteps; run the assign_timesteps pass first")
        self.graph, self.store, self.mode, self.mask_steps = graph, store, mode, mask_steps
        self.keep_values, self.spike_form = keep_values, spikes
        values = graph_inputs(graph, inputs)
        if mode == "event":
            keep_large_allocations()  # the [T, ...] stacks outgrow glibc's mmap threshold: see spikecompile.heap
            values = {name: _arrive_at_t0(value, graph[name].timesteps) for name, value in values.items()}
        self.values = values
        self.fired: dict[str, Tensor | SpikeTally] = {}
        self.running: dict[str, Tensor] = {}  # event mode: the running sums X_t a product or nonlinearity made
        self.stepped = {name for name, value in values.items() if mode == "event" and value.is_floating_point()}
        self.shapes = {name: tuple(value.shape[1:] if name in self.stepped else value.shape)
                       for name, value in values.items()}
        self.wiring = structure(graph)
        self.waiting = dict(self.wiring.consumers)
        self.rules = EVENT_RULES if mode == "event" else {}
        self.summed = readout_only(graph) if mode == "event" and not keep_values else frozenset()

    def events(self, source: str) -> Tensor:
        """The source's per-step values (a running-sum node's: the differences of its sums, made once)."""
        if source not in self.values:
            self.values[source] = _differences(self.running[source].clone())
        return self.values[source]

    def window(self, source: str) -> Tensor:
        """What the source delivers over the whole window, Σ_t x_t: a running-sum node's last step."""
        if source not in self.stepped:
            return self.values[source]
        return self.running[source][-1] if source in self.running else self.events(source).sum(0)

    @torch.no_grad()
    def advance(self, names) -> None:
        """Run the nodes `names`, the next ones of the topological order (wiring.order) in that order."""
        graph, mode, values, running = self.graph, self.mode, self.values, self.running
        for name in names:
            if name in self.shapes:
                continue
            node = graph[name]
            sources = self.wiring.inputs[name]
            try:
                if isinstance(node, PhaseNeuron):  # integrate-then-fire: the whole input window
                    x = self.window(sources["x"]) if mode == "event" else values[sources["x"]]
                    values[name], self.fired[name] = _fire(node, x, mode, self.mask_steps, self.spike_form)
                elif mode == "event" and (name in self.summed or isinstance(node, Output)):
                    # only the sum of the steps is ever read: the decoded rule on the inputs' windows
                    values[name] = RUNNERS[type(node)](
                        node, {port: self.window(source) for port, source in sources.items()}, self.store)
                elif mode == "event" and type(node) in RUNNING_RULES:
                    sums = {port: (running[source], False) if source in running
                            else (_running_sums(self.events(source)), True) for port, source in sources.items()}
                    running[name] = RUNNING_RULES[type(node)](node, sums, self.store)
                else:
                    rule = self.rules.get(type(node)) or RUNNERS[type(node)]
                    node_inputs = {port: self.events(source) if mode == "event" else values[source]
                                   for port, source in sources.items()}
                    values[name] = rule(node, node_inputs, self.store)
            except (RuntimeError, ValueError) as error:
                raise SpikecompileError(f"node {name}: {type(node).__name__}: {error}") from None
            made = running[name] if name in running else values[name]
            is_stepped = (mode == "event" and made.is_floating_point() and not isinstance(node, Output)
                          and name not in self.summed)
            self.stepped.update([name] if is_stepped else [])
            self.shapes[name] = tuple(made.shape[1:] if is_stepped else made.shape)
            for source in sources.values():
                self.waiting[source] -= 1
                if not self.keep_values and self.waiting[source] == 0:
                    values.pop(source, None)
                    running.pop(source, None)

    def held_bytes(self) -> int:
        """The bytes of the values this run holds now (between two layers: what the next one reads)."""
        return sum(value.nbytes for held in (self.values, self.running) for value in held.values())

    def recording(self) -> Recording:
        """The run so far (the whole order advanced: the graph's Recording)."""
        for name in list(self.running):  # kept values: every node's per-step values
            self.events(name)
        return Recording(self.values, self.fired, self.mode, self.shapes, frozenset(self.stepped))


def layer_segments(graph: Graph) -> list[tuple[str, ...]]:
    """The topological order cut where the decoder layer (ir.layer_of) changes: the embedding's nodes, each
    layer's, the head's (in the LLaMA graphs each layer's nodes are contiguous in the order)."""
    segments: list[list[str]] = []
    for name in structure(graph).order:
        if not segments or layer_of(name) != layer_of(segments[-1][-1]):
            segments.append([])
        segments[-1].append(name)
    return [tuple(segment) for segment in segments]


def run_windows(graph: Graph, store, windows: list[Tensor], mode: str = "decoded", mask_steps: int | None = None,
                held_bytes: int = HELD_BYTES, progress: Callable[[int], None] | None = None) -> Iterator[Recording]:
    """run(..., keep_values=False, spikes="tally") of each window, yielded in window order, computed layer by layer:
    windows go through the first layer segment one by one into a group until the values they hold reach
    `held_bytes` (at least one), then the whole group goes through each later segment before the next, and each
    window's run is yielded as it leaves the last (its logits are freed before the next window's are made). Each
    weight is read from the store once per group and segment (SegmentReads).
    progress: called with the number of windows that have just gone through one more layer segment."""
    segments = layer_segments(graph)
    reads = SegmentReads(store)
    pending = iter(windows)
    while True:
        group, held = [], 0
        for ids in pending:
            execution = Execution(graph, reads, ids, mode, mask_steps, keep_values=False, spikes="tally")
            execution.advance(segments[0])
            group.append(execution)
            held += execution.held_bytes()
            if held >= held_bytes:
                break
        reads.forget()
        if not group:
            return
        for segment in segments[1:-1]:
            for execution in group:
                execution.advance(segment)
            reads.forget()
            if progress is not None:
                progress(len(group))
        group.reverse()  # popped from the end: the first window leaves first
        while group:
            execution = group.pop()
            execution.advance(segments[-1] if len(segments) > 1 else ())
            yield execution.recording()
            del execution
        reads.forget()


class SegmentReads(Mapping):
    """The store as run_windows reads it: a tensor read in a layer segment is kept until forget() (at the end of
    the segment), so the windows of a group read and cast each weight once, not once each (a 7B model's weights
    come back from the build's scratch files and are widened from bf16 every time they are read). Holds one
    segment's weights: a decoder layer of a 7B model in float32, 0.8 GB."""

    def __init__(self, store):
        self.store, self.kept = store, {}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.kept:
            self.kept[name] = self.store[name]
        return self.kept[name]

    def __contains__(self, name) -> bool:
        return name in self.store

    def __iter__(self):
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)

    def forget(self) -> None:
        self.kept.clear()


def readout_only(graph: Graph) -> frozenset[str]:
    """The nodes (no neurons) whose every consumer is an Output or another such node — in the LLaMA graphs the
    lm_head. In event mode only the sum of their steps is ever read (an Output sums its input's steps), and that
    sum telescopes exactly to the node's decoded rule on its summed inputs (linear: W·Σx_t + b; nonlinear:
    Σ_t f(X_t) − f(X_{t−1}) = f(X_{T−1}); products: Σ_t out_t = ΣA·ΣB), so run(keep_values=False) computes it
    once instead of T times (the lm_head's T-step logits stack is T·seq·vocab floats). Spikes are untouched:
    no neuron reads these nodes, so the per-step contract with the ONNX event form is kept."""
    wiring = structure(graph)
    consumers: dict[str, list[str]] = {name: [] for name in wiring.order}
    for name in wiring.order:
        for source in wiring.inputs[name].values():
            consumers[source].append(name)
    summed: set[str] = set()
    for name in reversed(wiring.order):
        node = graph[name]
        if isinstance(node, PhaseNeuron | Output) or not wiring.inputs[name] or not consumers[name]:
            continue
        if all(isinstance(graph[user], Output) or user in summed for user in consumers[name]):
            summed.add(name)
    return frozenset(summed)


def output_of(graph: Graph, recording: Recording) -> Tensor:
    """The value of the graph's one Output: decoded, whatever the mode (event mode sums its steps)."""
    (name,) = [name for name in graph if isinstance(graph[name], Output)]
    return recording.values[name]


def _arrive_at_t0(value: Tensor, steps: int | None) -> Tensor:
    """An input in event form: whole at t = 0 (token ids are not stepped: the embedding places its rows)."""
    return _at_t0(value, steps or 1) if value.is_floating_point() else value


def _fire(node: PhaseNeuron, window: Tensor, mode: str, mask_steps: int | None,
          form: str = "planes") -> tuple[Tensor, Tensor | SpikeTally]:
    """The neuron on its input `window` (the decoded input, or in event mode Σ_t x_t): (its value — x̂, or in event
    mode y_t = σ·d(t)·s_t [T, ...] —, its spikes in `form`). Per-token scales: the neuron fires on window / τ_row
    and its value is scaled back by τ_row (ir.PhaseNeuron)."""
    neuron = neuron_of(node)
    scale = token_scales(window, node.token_levels) if node.token_levels else None
    # one fused pass (neuron.kernel), late-spike masking and signed digits included
    fired = kernel.fire(window if scale is None else window / scale, neuron, out=mode == "decoded",
                        events=mode == "event", spikes=form == "planes", rows=form == "tally", mask_steps=mask_steps)
    spikes = fired.spikes if form == "planes" else SpikeTally.of_rows(fired.per_step, fired.rows)
    value = fired.out if mode == "decoded" else fired.events
    return (value if scale is None else value * scale), spikes


# event rules for the nodes whose decoded rule does not apply to every step as is

def _at_t0(constant: Tensor, steps: int) -> Tensor:
    stepped = constant.new_zeros(steps, *constant.shape)
    stepped[0] = constant
    return stepped


def _embedding(node: Embedding, inputs, store) -> Tensor:
    return _at_t0(RUNNERS[Embedding](node, inputs, store), node.timesteps)


def _linear(node: Linear, inputs, store) -> Tensor:
    out = torch.nn.functional.linear(inputs["x"], node.weight.resolve(store))
    if node.bias is not None:
        out[0] += node.bias.resolve(store)
    return out


def _kv_prefix(node: KVPrefix, inputs, store) -> Tensor:
    x = inputs["x"]
    cache = node.cache.resolve(store).to(x.device, x.dtype)
    stepped = _at_t0(cache.expand(*x.shape[1:-3], *cache.shape), x.shape[0])
    return torch.cat([stepped, x], dim=-2)


def _nonlinear(node: Nonlinear, sums, store) -> Tensor:
    """f(X_t): the running sums whose differences are out_t = f(X_t) − f(X_{t−1}), out_0 = f(X_0)."""
    (running, fresh), = sums.values()
    return NONLINEAR_FUNCTIONS[node.function](node, running, store, scratch=fresh)


def _running_sums(x: Tensor) -> Tensor:
    """X_t = X_{t−1} + x_t in x's dtype, step by step — as ONNX CumSum adds (torch.cumsum accumulates float32
    in double, and runs a strided kernel several times slower on [T, heads, S, S] stacks)."""
    running = torch.empty_like(x)
    running[0] = x[0]
    for t in range(1, x.shape[0]):
        torch.add(running[t - 1], x[t], out=running[t])
    return running


def _differences(running: Tensor) -> Tensor:
    """out_0 = running_0, out_t = running_t − running_{t−1}, in place (last step first)."""
    for t in range(running.shape[0] - 1, 0, -1):
        running[t] -= running[t - 1]
    return running


def _running_product(product: Callable[[Tensor, Tensor], Tensor], sums) -> Tensor:
    """S_A(t)·S_B(t) for a bilinear `product`: the running sums whose differences
    out_t = S_A(t)·S_B(t) − S_A(t−1)·S_B(t−1) are docs/method.md's causal rule S_A(t)·B_t + A_t·S_B(t) − A_t·B_t
    (expand S_A(t) = S_A(t−1) + A_t) with one product per step instead of three; Σ_t out_t = product(ΣA, ΣB)."""
    return product(sums["a"][0], sums["b"][0])


def _activation_matmul(node: ActivationMatmul, sums, store) -> Tensor:
    def product(a, b):
        return RUNNERS[ActivationMatmul](node, {"a": a, "b": b}, store)
    return _running_product(product, sums)


def _elementwise_product(node: ElementwiseProduct, sums, store) -> Tensor:
    return _running_product(torch.mul, sums)


RUNNING_RULES: dict[type[IRNode], Callable] = {
    Nonlinear: _nonlinear,
    ActivationMatmul: _activation_matmul,
    ElementwiseProduct: _elementwise_product,
}
"""Event rules that read their inputs' running sums X_t = x_0 + … + x_t and make their own (each input's as
{port: (X, fresh)}, fresh: made for this node, so f may overwrite it): a running-sum node's per-step values are
the differences of its sums, made when a per-step consumer reads them, and a neuron or Output reading it takes its
last step as the window Σ_t x_t. The float operations are a contract with the ONNX event form
(backends.onnx.lower), which must give the same spike planes bit for bit: change them together."""


EVENT_RULES: dict[type[IRNode], Callable] = {
    Embedding: _embedding,
    Linear: _linear,
    KVPrefix: _kv_prefix,
}
"""Event rules differing from the decoded ones; every other node type (Rotation, RoPE, SplitHeads, MergeHeads,
ResidualAdd) is linear without a constant and maps each step with its decoded rule. Input: _arrive_at_t0."""
