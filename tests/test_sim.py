"""The reference simulator: event mode equals decoded mode, spike counts equal the decoded codes' popcounts,
and the counters follow results.CONVENTION (checked against brute-force enumeration)."""

import pytest
import torch
from conftest import assert_masking_fewer_spikes_same_in_both_modes, convert_tiny

from spikecompile.backends.sim import simulate
from spikecompile.backends.sim.counting import count
from spikecompile.backends.sim.simulate import run
from spikecompile.build import BuildOptions, build
from spikecompile.errors import SpikecompileError
from spikecompile.ir import ActivationMatmul, Graph, Input, Output, PhaseNeuron, interpret, retyped
from spikecompile.neuron import base2_params, mask_late_spikes, phase_encode


def _ids(length=20, seed=0):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny model converted (T=6, 2 grains, rotation, prefix) and built (folded IR)."""
    return build(convert_tiny(tmp_path_factory.mktemp("sim")), BuildOptions())


@pytest.fixture(scope="module")
def float64_traces(built):
    graph, store = retyped(built.graph, built.store, torch.float64)
    return graph, store, run(graph, store, _ids(), "decoded"), run(graph, store, _ids(), "event")


def test_decoded_mode_is_the_interpreter(built):
    ids = _ids()
    recording = run(built.graph, built.store, ids, "decoded")
    (output,) = [name for name in built.graph if isinstance(built.graph[name], Output)]
    assert torch.equal(recording.values[output], interpret(built.graph, built.store, ids))


def test_event_and_decoded_agree_node_by_node(float64_traces):
    graph, _, decoded, event = float64_traces
    for name, value in decoded.values.items():
        summed = event.values[name].sum(0) if name in event.stepped else event.values[name]
        scale = value.abs().max().clamp(min=1e-12) if value.is_floating_point() else 1
        assert ((summed - value).abs().max() / scale) < 1e-9, name


def test_spike_counts_equal_the_decoded_popcounts(float64_traces):
    graph, _, decoded, event = float64_traces
    assert set(event.spikes) == {name for name in graph if isinstance(graph[name], PhaseNeuron)}
    for name, spikes in event.spikes.items():
        assert torch.equal(spikes, decoded.spikes[name]), name
        # and the popcount of the code the decoded value implies
        (source,) = graph.inputs(name).values()
        _, code = phase_encode(decoded.values[source], graph[name].params())
        assert int(spikes.sum()) == int(code.sum())


def test_event_values_are_per_step(float64_traces):
    graph, _, _, event = float64_traces
    neuron = "layers.0.silu"
    steps = graph[neuron].timesteps
    assert event.values[neuron].shape[0] == steps
    embed = event.values["embed_tokens"]
    assert embed[1:].abs().sum() == 0 and embed[0].abs().sum() > 0  # a constant enters at t = 0


def test_counts_are_the_same_in_both_modes(built):
    ids = _ids()
    decoded = simulate(built.graph, built.store, ids, "decoded", dtype=torch.float64)
    event = simulate(built.graph, built.store, ids, "event", dtype=torch.float64)
    assert decoded.snn == event.snn and decoded.ann == event.ann and decoded.sites == event.sites
    assert event.tokens == ids.shape[1]
    site = event.sites["layers.1.silu"]
    assert site["firing_rate"] == pytest.approx(sum(site["spikes_per_step"]) / (site["elements"] * 6))


def test_linear_counts_one_ac_per_spike_and_fan_out(built):
    ids = _ids()
    result = simulate(built.graph, built.store, ids, "decoded")
    spikes = sum(result.sites["layers.0.mlp_norm"]["spikes_per_step"])
    gate = result.snn["layers.0.mlp.gate_proj"]
    out_features = built.graph["layers.0.mlp.gate_proj"].weight.shape[0]
    rows = ids.shape[1]
    assert gate.ac == spikes * out_features
    assert gate.mac == rows * out_features * 6  # the step gain d(t): one per output per step
    ann = result.ann["layers.0.mlp.gate_proj"]
    assert ann.mac == rows * out_features * built.graph["layers.0.mlp.gate_proj"].weight.shape[1]


def test_online_hadamard_counts_the_factors_it_runs(built):
    """The online Hadamard before down_proj costs, per element and step, one add per butterfly stage of its 2^a
    factor and K multiply-adds for its K block, with n = 2^a·K as its construction splits n (not n's whole power of
    two: 11008 runs as 32·344, not 256·43, which has no Hadamard block)."""
    from spikecompile.backends.sim.counting import rotation_ops_per_element
    from spikecompile.hadamard import describe_hadamard, hadamard_factors
    from spikecompile.ir import Rotation

    ids = _ids()
    result = simulate(built.graph, built.store, ids, "decoded")
    name = "layers.0.mlp.online_hadamard"
    node = built.graph[name]
    sylvester, block = hadamard_factors(node.n)
    per_element = (sylvester.shape[0].bit_length() - 1) + (block.shape[0] if block.shape[0] > 1 else 0)
    assert rotation_ops_per_element(node) == per_element
    assert result.snn[name].mac == ids.shape[1] * node.n * per_element * node.timesteps
    assert result.ann[name].mac == ids.shape[1] * node.n * per_element
    for width, expected in ((4096, 12), (576, 4 + 36), (1536, 7 + 12), (11008, 5 + 344), (14336, 9 + 28)):
        rotation = Rotation(n=width, where="online", construction=describe_hadamard(width))
        assert rotation_ops_per_element(rotation) == expected


def _matmul_graph(which, shape_a, shape_b, groups=1):
    graph = Graph()
    graph.add_node("a", Input(shape=shape_a, dtype="float32", timesteps=4))
    graph.add_node("b", Input(shape=shape_b, dtype="float32", timesteps=4))
    for name in ("a", "b"):
        graph.add_node(f"layers.0.{'q' if name == 'a' else 'k'}",
                       PhaseNeuron.from_params(f"layers.0.{'q' if name == 'a' else 'k'}", base2_params(1.0, 4)))
        graph.add_edge(name, f"layers.0.{'q' if name == 'a' else 'k'}")
    graph.add_node("mm", ActivationMatmul(which=which, groups=groups, timesteps=4))
    graph.add_edge("layers.0.q", "mm", "a")
    graph.add_edge("layers.0.k", "mm", "b")
    graph.add_node("out", Output(timesteps=4))
    graph.add_edge("mm", "out")
    return graph


@pytest.mark.parametrize("attention", ["causal", "full"])
def test_qk_counts_match_brute_force(attention):
    heads, kv_heads, queries, keys, depth, steps = 4, 2, 5, 7, 3, 4  # 2 prefix keys
    graph = _matmul_graph("qk", (heads, queries, depth), (kv_heads, keys, depth), groups=2)
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(steps, heads, queries, depth, generator=generator) < 0.4
    b = torch.rand(steps, kv_heads, keys, depth, generator=generator) < 0.4
    shapes = {"a": a.shape[1:], "b": b.shape[1:], "layers.0.q": a.shape[1:], "layers.0.k": b.shape[1:],
              "mm": (heads, queries, keys), "out": (heads, queries, keys)}
    snn, ann = count(graph, shapes, {"layers.0.q": a, "layers.0.k": b}, attention)
    visible = [[j for j in range(keys) if attention == "full" or j <= i + keys - queries] for i in range(queries)]
    expected = 0  # every (spike, output it reaches) pair, enumerated
    for t in range(steps):
        for h in range(heads):
            for i in range(queries):
                for k in range(depth):
                    expected += int(a[t, h, i, k]) * len(visible[i])
                    expected += sum(int(b[t, h // 2, j, k]) for j in visible[i])
    running_sums = int(a.sum() + b.sum())
    assert snn["mm"].ac == expected + running_sums
    assert ann["mm"].mac == heads * sum(len(v) for v in visible) * depth


def test_masking_drops_late_spikes_and_is_the_same_in_both_modes(built):
    spikes = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    assert mask_late_spikes(spikes, 2).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert torch.equal(mask_late_spikes(spikes, 4), spikes)
    assert_masking_fewer_spikes_same_in_both_modes(built, _ids())


def test_bad_options(built):
    with pytest.raises(SpikecompileError, match="attention counting 'sparse'"):
        simulate(built.graph, built.store, _ids(), attention="sparse")
    with pytest.raises(SpikecompileError, match="mode 'spiking'"):
        run(built.graph, built.store, _ids(), "spiking")
    unassigned = built.graph.copy()
    import dataclasses
    unassigned.replace("logits", dataclasses.replace(unassigned["logits"], timesteps=None))
    with pytest.raises(SpikecompileError, match="node logits: no timesteps; run the assign_timesteps pass"):
        run(unassigned, built.store, _ids(), "event")


def test_readout_only_nodes_are_summed_once_when_values_are_dropped(built):
    """The lm_head feeds only the Output (which sums its steps): without kept values event mode computes its
    decoded rule once on the summed input; logits within rounding, spikes the same."""
    from spikecompile.backends.sim.simulate import output_of, readout_only

    graph, store = retyped(built.graph, built.store, torch.float64)
    assert readout_only(graph) == {"lm_head"}
    ids = _ids()
    kept, dropped = run(graph, store, ids, "event"), run(graph, store, ids, "event", keep_values=False)
    assert "lm_head" in kept.stepped and "lm_head" not in dropped.stepped
    torch.testing.assert_close(output_of(graph, dropped), output_of(graph, kept), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(kept.spikes[name], dropped.spikes[name]) for name in kept.spikes)


def test_tallies_are_the_planes_counts(built):
    """spikes="tally" keeps per-step and per-position counts equal to the planes' (and counts the same)."""
    from spikecompile.backends.sim.counting import SpikeTally

    ids = _ids()
    planes = run(built.graph, built.store, ids, "decoded")
    tallies = run(built.graph, built.store, ids, "decoded", keep_values=False, spikes="tally")
    for name, spikes in planes.spikes.items():
        assert tallies.spikes[name] == SpikeTally.of(spikes), name
        assert tallies.spikes[name].per_step == tuple(spikes.flatten(1).sum(1).tolist())
    assert count(built.graph, planes.shapes, planes.spikes) == count(built.graph, tallies.shapes, tallies.spikes)
    with pytest.raises(SpikecompileError, match="spikes 'codes'"):
        run(built.graph, built.store, ids, spikes="codes")


def test_products_are_the_causal_running_sum_rule():
    """The event rule for A·B makes S_A(t)·S_B(t); its step differences are docs/method.md's
    S_A(t)·B_t + A_t·S_B(t) − A_t·B_t, and they sum to (ΣA)·(ΣB)."""
    from spikecompile.backends.sim.simulate import _differences, _running_product, _running_sums

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(6, 3, 4, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    for product, second in ((torch.matmul, b.transpose(-2, -1)), (torch.mul, b)):
        sums = {"a": (_running_sums(a), True), "b": (_running_sums(second), True)}
        out = _differences(_running_product(product, sums))
        method = product(a.cumsum(0), second) + product(a, second.cumsum(0)) - product(a, second)
        torch.testing.assert_close(out, method, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.sum(0), product(a.sum(0), second.sum(0)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("function", ["rmsnorm", "softmax", "silu"])
def test_scratch_nonlinear_functions_give_the_same_bits(built, function):
    """Event mode lets f overwrite its running-sum argument (scratch=True): the same values bit for bit, and the
    default leaves its input alone."""
    from spikecompile.ir.interpret import NONLINEAR_FUNCTIONS

    node = next(built.graph[name] for name in built.graph if getattr(built.graph[name], "function", "") == function)
    width = node.weight.shape[0] if function == "rmsnorm" else 9
    shape = (3, 2, 7, width)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    kept = x.clone()
    plain = NONLINEAR_FUNCTIONS[function](node, x, built.store)
    assert torch.equal(x, kept)
    assert torch.equal(NONLINEAR_FUNCTIONS[function](node, x.clone(), built.store, scratch=True), plain)


def test_large_allocations_are_served_from_the_heap():
    """spikecompile.heap switches glibc to reuse freed heap memory (event mode does on its first run); tensors above
    the old 32 MiB mmap ceiling still allocate, free and allocate again, in this thread and in another."""
    import platform
    import threading

    from spikecompile.heap import keep_large_allocations

    switched = keep_large_allocations()
    assert switched == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    sums = []
    for _ in range(2):
        sums.append(float(torch.ones(12_000_000, dtype=torch.float32).sum()))  # 48 MB
    worker = threading.Thread(target=lambda: sums.append(float(torch.ones(12_000_000).sum())))
    worker.start()
    worker.join()
    assert sums == [12_000_000.0] * 3


def test_measure_keeps_no_windows_logits(built, monkeypatch):
    """measure keeps every window's counts but drops its logits once their NLL is taken: 64 windows of SmolLM2's
    512 × 49152 logits held 6.4 GB (a 128256-token vocabulary, 16 GB)."""
    import gc
    import weakref

    from spikecompile.backends import sim
    from spikecompile.backends.sim import measure as measuring

    produced, alive = [], []

    def simulate_and_watch(*args, **kwargs):
        for result in sim.simulate_windows(*args, **kwargs):
            gc.collect()
            alive.append(sum(ref() is not None for ref in produced))  # earlier windows' logits still held
            produced.append(weakref.ref(result.logits))
            yield result

    monkeypatch.setattr(measuring, "simulate_windows", simulate_and_watch)
    windows = [_ids(seed=seed) for seed in range(3)]
    result, ppl = measuring.measure(built.graph, built.store, windows, "decoded", progress=False)
    assert alive == [0, 0, 0] and result.logits is None and ppl > 0


@pytest.mark.parametrize("mode", ["decoded", "event"])
@pytest.mark.parametrize("held_bytes", [0, 1 << 30], ids=["groups of one window", "one group"])
def test_windows_run_layer_by_layer_are_each_window_run_alone(built, mode, held_bytes):
    """run_windows takes every window of a group through one layer before the next: each window's outputs, spike
    tallies and shapes are bitwise those of running it alone."""
    from spikecompile.backends.sim.simulate import layer_segments, output_of, run_windows

    windows = [_ids(seed=seed) for seed in range(3)]
    assert len(layer_segments(built.graph)) == 4  # the embedding, two decoder layers, the head
    together = list(run_windows(built.graph, built.store, windows, mode, held_bytes=held_bytes))
    assert len(together) == len(windows)
    for ids, recording in zip(windows, together, strict=True):
        alone = run(built.graph, built.store, ids, mode, keep_values=False, spikes="tally")
        assert torch.equal(output_of(built.graph, recording), output_of(built.graph, alone))
        assert recording.spikes == alone.spikes and recording.shapes == alone.shapes


def test_windows_in_a_group_read_each_weight_once(built):
    """run_windows reads each tensor from the store once per group and layer segment (SegmentReads), however many
    windows the group has; window by window, each window read every weight again."""
    from collections import Counter

    from spikecompile.backends.sim.simulate import run_windows

    class CountingStore(dict):
        reads: Counter = Counter()

        def __getitem__(self, name):
            self.reads[name] += 1
            return super().__getitem__(name)

    store = CountingStore(built.store.items())
    windows = [_ids(seed=seed) for seed in range(3)]
    for held_bytes, reads_per_tensor in ((1 << 30, {1}), (0, {3})):  # one group of three; three groups of one
        store.reads.clear()
        list(run_windows(built.graph, store, windows, "decoded", held_bytes=held_bytes))
        assert set(store.reads.values()) == reads_per_tensor and len(store.reads) > 10
