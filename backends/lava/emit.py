"""`spikecompile build --target lava`: lower an IR graph — the whole model, a range of decoder layers or one
block — to a self-contained Lava program folder that needs only numpy and lava-nc:

    README.md       what was emitted, how d(t) is realised, the fixed-point formats and bounds, how to run
    run.py          python run.py [--tag fixed_pt] [--input x.npz]: runs under Loihi2SimCfg, checks the reference
    network.json    the processes (runtime/program.py documents the format), connections and step schedule
    weights/        per synapse: W (float32) and its 8-bit mantissa m (int8), W ≈ m·2^e
    arrays/         the ops' constant arrays (norm weights, RoPE tables, KV prefix caches, rotation matrices)
    reference.npz   an example input, the decoded reference output (float and with the fixed-point weights)
                    and each site's spike count per neuron
    lava_program/   runtime/ copied verbatim: compat.py, processes.py, program.py

Lowering: a PhaseNeuron becomes a processes.PhaseNeuronProcess (its thresholds θ(t) − v0 for any v0, its spike budget K
enforced by the per-neuron spike counter); a Linear fed by a spike site becomes lava synapses
(Dense for one token, Sparse block-diagonal kron(I_tokens, W) for several); every other node a small Python Op
running its event rule. d(t) is a receiver-side per-step gain: a spike carries σ ∈ {−1, +1} (graded, 2-bit
payload), the synapse sums W·σs (floating_pt) or 2m·σs (fixed_pt, exact integers), and whatever receives the
site's spikes or the synapse's sums multiplies step t by d(t) (fixed_pt: d(t)·2^(e−1)). All the neurons of one
site share d(t), so one gain per input port is exact.

Schedule: the Lava step at which each node's event step 0 is sent — an Input at 0, an Op at the latest of its
inputs (it buffers the earlier ones), a synapse one step after its site (lava's Dense/Sparse latency), a neuron
at the step its last input arrives (integrate-then-fire).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spikecompile.data import TextSource, token_windows
from spikecompile.errors import SpikecompileError
from spikecompile.evaluation import perplexity
from spikecompile.files import atomic_write
from spikecompile.hardware.loihi2 import (
    OP_FORMAT,     Loihi2, flip_level, gain, grid_bits, load_loihi2, potential_exponent, quantize_rows, quantize_weights,
    residual_schedule, synapse_gain, window_peak,
)
from spikecompile.ir import (
    ActivationMatmul, ElementwiseProduct, Embedding, Graph, Input, IRNode, KVPrefix, Linear, MergeHeads, Nonlinear,
    Output, PhaseNeuron, ResidualAdd, RoPE, Rotation, SplitHeads, decoder_block, decoder_layers, evaluate, validate,
)
from spikecompile.ir.shapes import bind
from spikecompile.neuron import phase_encode
from spikecompile.passes.deployment import (
    CalibrationRun, calibration_text, check_overflow, deployment_lines, fitted_fraction_bits, formats_report,
    payload_grids_entry, sample_saturation,
)
from spikecompile.passes.loihi_mapping import Formats, deployed_formats
from spikecompile.progress import bar, shown

from .. import widened_result

FORMAT = "spikecompile.lava"
FORMAT_VERSION = 1
PACKAGE = "lava_program"
RUNTIME_FILES = ("__init__.py", "compat.py", "processes.py", "program.py")
BLOCKS = ("attn", "mlp")
D_REALISATION = ("receiver-side per-step gain: spikes carry the sign σ ∈ {−1, +1} as a 2-bit graded payload; a "
                 "synapse sums W·σs (fixed_pt: 2m·σs, exact integers); whatever receives a site's spikes or its "
                 "synapses' sums multiplies step t by that site's d(t) (fixed_pt: d(t)·2^(e−1))")
RUN_PY = '''"""Run this spikecompile Lava program (needs numpy and lava-nc 0.10.0 only): see README.md."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    from lava_program.program import main

    main(HERE)
'''


@dataclasses.dataclass
class Program:
    """A lowered part: network.json's content, the arrays it names (by relative path), and facts for the
    report."""

    network: dict
    arrays: dict[str, np.ndarray]
    fixed_point: dict


def build_lava(result, folder: str | Path, layers=None, block: str | None = None, tokens: int = 4,
               seed: int = 0, text: TextSource | None = None, windows: int = 1, seqlen: int | None = None,
               allow_saturation: bool = False, progress: bool = False, loihi2_target: Loihi2 | None = None) -> dict:
    """Emit the Lava program of `result` (a build.BuildResult) into `folder` for `loihi2_target` (default: the
    packaged targets/loihi2.toml); return the report.

    layers: None (the whole model) or consecutive decoder layer indices; block: "attn" or "mlp" for one block
    of the one layer given (layer 0 without layers). tokens: the sequence length the program runs (batch 1);
    seed: of the example token ids behind reference.npz. text: the fixed-point model's perplexity and saturations
    are measured on `windows` windows of `seqlen` tokens of it (default: saturations on the model's calibration
    text, when it can be read); an accumulator of the part that overflows there is a SpikecompileError unless
    allow_saturation (deployment.check_overflow), raised before anything is written. progress: bars on a
    terminal's stderr (progress.bar): the fixed-point run over the windows, the lowering per IR node, the write
    per array file.
    """
    result = widened_result(result)
    seconds = {}
    start = time.perf_counter()
    part, feeds, label = select_part(result.graph, layers, block)
    inputs = example_inputs(result.graph, result.store, feeds, tokens, seed)
    seconds["select"] = time.perf_counter() - start
    start = time.perf_counter()
    target = loihi2_target or load_loihi2()
    fraction_bits = fitted_fraction_bits(result.graph, result.store, target, result.record, result.tokenizer)
    formats = deployed_formats(part, result.store, target, fraction_bits)
    deployment = deployment_report(result, part, formats, text, windows, seqlen, allow_saturation, shown(progress),
                                   fraction_bits, target)
    seconds["deployment"] = time.perf_counter() - start
    start = time.perf_counter()
    program = lower(part, result.store, tokens, target, formats, progress)
    program.network["payload_fraction_bits"] = {name: bits for name, bits in (fraction_bits or {}).items()
                                                if name in part}
    seconds["lower"] = time.perf_counter() - start
    start = time.perf_counter()
    quantized = quantized_store(part, result.store, target.limits["weight_bits"])
    reference = reference_arrays(part, result.store, inputs, quantized)
    seconds["reference"] = time.perf_counter() - start
    start = time.perf_counter()
    report = {**_report(part, label, tokens, program, reference), "deployment": deployment}
    write_program(folder, program, reference, readme(report), progress)
    seconds["write"] = time.perf_counter() - start
    report["seconds"] = seconds
    report["bytes"] = sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
    return report


# ---- which part --------------------------------------------------------------------------------------------------

def select_part(graph: Graph, layers, block: str | None) -> tuple[Graph, dict[str, str], str]:
    """(the part as a graph, {its Input: the full graph's node that feeds it}, a label)."""
    if layers is not None:
        layers = sorted(int(layer) for layer in layers)
        if not layers or layers != list(range(layers[0], layers[-1] + 1)):
            raise SpikecompileError(f"layers {layers}: give one layer or a range of consecutive layers")
    if block is not None:
        if block not in BLOCKS:
            raise SpikecompileError(f"block {block!r}: choose one of {', '.join(BLOCKS)}")
        if layers is not None and len(layers) != 1:
            raise SpikecompileError(f"block {block} of layers {layers}: a block is cut from one layer; give one")
        layer = layers[0] if layers else 0
        part = decoder_block(graph, layer, block)
        norm = part.consumers("block_input")[0]
        return part, {"block_input": graph.inputs(norm)["x"]}, f"layer {layer} {block} block"
    if layers is None:
        return graph, {name: name for name in graph if isinstance(graph[name], Input)}, "whole model"
    part, source = decoder_layers(graph, layers[0], layers[-1])
    return part, {"layers_input": source}, f"decoder layers {layers[0]}..{layers[-1]}"


def example_inputs(graph: Graph, store, feeds: dict[str, str], tokens: int, seed: int) -> dict[str, Tensor]:
    """The part's inputs for `tokens` random token ids (seeded): what feeds them when the whole model runs."""
    (ids_name,) = [name for name in graph if isinstance(graph[name], Input)]
    embedding = next(graph[name] for name in graph if isinstance(graph[name], Embedding))
    ids = torch.randint(3, embedding.weight.shape[0], (1, tokens), generator=torch.Generator().manual_seed(seed))
    if all(source == name for name, source in feeds.items()):
        return {ids_name: ids}
    values = evaluate(graph, store, ids)
    return {name: values[source] for name, source in feeds.items()}


# ---- lowering -----------------------------------------------------------------------------------------------------

def lower(part: Graph, store, tokens: int, target: Loihi2, formats: Formats | None = None,
          progress: bool = False) -> Program:
    """The program of `part` run at `tokens` tokens (module docstring), in `formats` (default: deployed_formats);
    progress: a bar per IR node on a terminal's stderr."""
    types = validate(part)
    shapes = {name: [bind(dim, {"batch": 1, "seq": tokens}) for dim in types[name].shape] for name in part}
    lowering = _Lowering(part, store, shapes, target, formats or deployed_formats(part, store, target))
    for name in bar(part.topological_order(), desc="lava: lower", unit="node", progress=progress):
        lowering.add(name)
    steps = max(lowering.start[name] + part[name].timesteps for name in part)
    fixed_steps = max(start + length for start, length in lowering.fixed.values())
    network = {"format": FORMAT, "format_version": FORMAT_VERSION, "tokens": tokens, "steps": steps,
               "d_realisation": D_REALISATION,
               "fixed_point": {"weight_bits": target.limits["weight_bits"], "state_bits": target.limits["state_bits"],
                               "state_limit": 2 ** (target.limits["state_bits"] - 1) - 1},
               "fixed_pt": {"steps": fixed_steps},
               "processes": lowering.processes, "connections": lowering.connections}
    return Program(network, lowering.arrays, lowering.fixed_point)


class _Lowering:
    """Lowers nodes in topological order, keeping each node's start step and, for nodes whose output is spikes
    or synapse sums, the gain its receivers apply."""

    def __init__(self, part: Graph, store, shapes: dict[str, list[int]], target: Loihi2, formats: Formats):
        self.part, self.store, self.shapes, self.target, self.formats = part, store, shapes, target, formats
        self.start: dict[str, int] = {}
        self.fixed: dict[str, tuple[int, int]] = {}  # fixed_pt: (the step its first message is sent, steps)
        self.gains: dict[str, dict[str, list[float]]] = {}
        self.processes: list[dict] = []
        self.connections: list[list] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.fixed_point: dict = {"synapses": {}, "sites": {}}

    def add(self, name: str) -> None:
        node = self.part[name]
        producers = list(self.part.inputs(name).values())
        self.connections += [[source, name, index] for index, source in enumerate(producers)]
        entry = lowering(node)(self, name, node, producers)
        self.processes.append({"name": name, "shape": self.shapes[name], **entry})

    def input(self, name: str) -> dict:
        self.start[name] = 0
        self.fixed[name] = (0, 1)
        return {"kind": "input"}

    def port(self, source: str) -> dict:
        return {"shape": self.shapes[source], "start": self.start[source], "steps": self.part[source].timesteps,
                "gain": self.gains.get(source)}

    def neuron(self, name: str, node: PhaseNeuron, source: str) -> dict:
        d, reset, theta, threshold = residual_schedule(node)
        exponent = potential_exponent(node, self.target.limits["state_bits"], self.target.guard_bits)
        unit = float(node.tau) * 2.0 ** -exponent
        port = self.port(source)
        gain = self.gains.get(source, {tag: [1.0] * port["steps"] for tag in ("floating_pt", "fixed_pt")})
        self.start[name] = port["start"] + port["steps"] - 1
        self.gains[name] = {"floating_pt": d.astype(np.float64).tolist(), "fixed_pt": d.astype(np.float64).tolist()}
        self.fixed_point["sites"][node.site] = {
            "F": exponent, "unit": unit, "lsb": float(node.tau) * 2.0 ** -node.timesteps,
            "level": flip_level(node), "input_rounding": port["steps"] * unit / 2,
            "exact_base2_grid": exponent >= grid_bits(node), "max_spikes": node.max_spikes,
            "v0": float(node.v0)}
        return {"kind": "neuron", "site": node.site, "size": int(np.prod(self.shapes[name])),
                "timesteps": node.timesteps, "fire_start": self.start[name], "max_spikes": node.max_spikes,
                "signed_digits": node.signed_digits,
                "input": {"start": port["start"], "steps": port["steps"],
                          "gain": {"floating_pt": gain["floating_pt"],
                                   "fixed_pt": (np.asarray(gain["fixed_pt"]) / unit).tolist()}},
                "threshold": {"floating_pt": threshold.astype(np.float64).tolist(),  # θ − v0 as float32 gives it
                              "fixed_pt": self.formats.sites[name].threshold.tolist()},
                "reset": {"floating_pt": reset.astype(np.float64).tolist(),
                          "fixed_pt": self.formats.sites[name].reset.tolist()},
                **self.fixed_neuron(name, source)}

    def fixed_neuron(self, name: str, source: str) -> dict:
        """The neuron's fixed_pt format (hardware.loihi2.SiteFormat): integer thresholds, resets and payload, the
        per-neuron gain of its window sum, and its fixed_pt schedule (its input window, then T steps)."""
        site, size = self.formats.sites[name], int(np.prod(self.shapes[name]))
        start, steps = self.fixed[source]
        if source in self.formats.synapses:
            synapse = self.formats.synapses[source]
            row_gain = synapse_gain(synapse, self.formats.sites[self.formats.sources[source]], site)
            scale = np.tile(row_gain, size // len(row_gain))
        else:
            scale = np.full(size, float(gain(1.0 / site.unit)))
        self.arrays[f"arrays/{name}.gain.npy"] = scale
        self.fixed[name] = (start + steps - 1, len(site.threshold))
        return {"fixed_pt": {"input": {"start": start, "steps": steps}, "fire_start": start + steps - 1,
                             "gain": f"arrays/{name}.gain.npy", "payload": site.payload.tolist()}}

    def synapse(self, name: str, node: Linear, source: str) -> dict:
        if not isinstance(self.part[source], PhaseNeuron):
            raise SpikecompileError(f"node {name}: a Linear fed by {source} ({type(self.part[source]).__name__}), "
                                    f"not by a spike site; the Lava backend lowers a Linear only as synapses")
        weights = node.weight.resolve(self.store).detach().float().numpy()
        deployed = self.formats.synapses[name]
        mantissa, exponent = quantize_weights(weights, self.target.limits["weight_bits"])
        files = {"floating_pt": f"weights/{name}.npy", "fixed_pt": f"weights/{name}.m8.npy"}
        self.arrays[files["floating_pt"]], self.arrays[files["fixed_pt"]] = weights, deployed.mantissa
        self.arrays[f"weights/{name}.scale.npy"] = deployed.scale
        self.fixed[name] = (self.fixed[source][0] + 1, self.part[source].timesteps)
        site = self.formats.sites[source]
        d = self.gains[source]["floating_pt"]
        self.gains[name] = {"floating_pt": d, "fixed_pt": (np.asarray(d) * 2.0 ** (exponent - 1)).tolist()}
        self.start[name] = self.start[source] + 1
        error = np.abs(weights - deployed.dequantized())
        level = self.fixed_point["sites"][self.part[source].site]["level"]
        self.fixed_point["synapses"][name] = {
            "flip_allowance": level * float(np.abs(weights).sum(axis=1).max()),
            "layout": deployed.layout, "max_error": float(error.max()), "max_abs": float(np.abs(weights).max()),
            "zero_fraction": float(np.mean(deployed.mantissa == 0)), "accumulator_peak": window_peak(deployed, site),
            "accumulator_limit": 2 ** (deployed.accumulator_bits - 1) - 1}
        return {"kind": "synapse", "in": node.in_features, "out": node.out_features,
                "tokens": int(np.prod(self.shapes[name])) // node.out_features, "weights": files,
                "message_bits": {"floating_pt": 2, "fixed_pt": site.payload_bits}}

    def op(self, name: str, node, producers: list[str], parameters: OpParameters) -> dict:
        op, params, arrays = parameters(node, self.store, self.shapes[producers[0]] if producers else None)
        files = {key: f"arrays/{name}.{key}.npy" for key in arrays}
        self.arrays.update({files[key]: value for key, value in arrays.items()})
        ports = [self.port(source) for source in producers]
        self.start[name] = max(port["start"] for port in ports)
        fixed_ports = [self.fixed_port(name, index, source) for index, source in enumerate(producers)]
        fixed_start = max(port["start"] + port["steps"] - 1 for port in fixed_ports)
        self.fixed[name] = (fixed_start, 1)
        return {"kind": "output" if isinstance(node, Output) else "op", "op": op, "ports": ports,
                "start": self.start[name], "timesteps": node.timesteps, "params": params, "arrays": files,
                "fixed_pt": {"ports": fixed_ports, "start": fixed_start}}

    def fixed_port(self, name: str, index: int, source: str) -> dict:
        """An op's fixed_pt input port: its window, and what its window sum is multiplied by (a site: δ; a
        synapse: s_i·δ/2 per row, in a file; anything else: nothing)."""
        start, steps = self.fixed[source]
        port = {"shape": self.shapes[source], "start": start, "steps": steps, "scale": None}
        if source in self.formats.sites:
            port["scale"] = self.formats.sites[source].delta
        elif source in self.formats.synapses:
            synapse = self.formats.synapses[source]
            port["scale"] = f"arrays/{name}.in{index}.scale.npy"
            self.arrays[port["scale"]] = synapse_gain(synapse, self.formats.sites[self.formats.sources[source]], None)
        return port


# One lowering per IR node type: an Input, a neuron or a synapse becomes its own kind of process, every other node
# an op process whose OPS key, scalar params and arrays come from its OpParameters function.

OpEntry = tuple[str, dict, dict[str, np.ndarray]]
"""(processes.OPS key, scalar params, arrays) of a non-spiking node."""
OpParameters = Callable[[IRNode, dict, list | None], OpEntry]
"""(node, store, its first input's shape) -> its OpEntry."""
Lowering = Callable[[_Lowering, str, IRNode, list[str]], dict]
"""(lowering state, node name, node, its producers) -> the node's process entry in network.json."""


def _tensor(ref, store) -> np.ndarray:
    return ref.resolve(store).detach().float().numpy()


def _nonlinear(node: Nonlinear, store, input_shape) -> OpEntry:
    if node.function == "rmsnorm":
        return "rmsnorm", {"eps": node.eps}, {} if node.weight is None else {"weight": _tensor(node.weight, store)}
    return node.function, {"causal": node.causal} if node.function == "softmax" else {}, {}


def _activation_matmul(node: ActivationMatmul, store, input_shape) -> OpEntry:
    return node.which, {"scaling": node.scaling, "groups": node.groups}, {}


def _heads(op: str) -> OpParameters:
    """SplitHeads and MergeHeads: the same params under their own OPS key."""
    return lambda node, store, input_shape: (op, {"heads": node.heads, "head_dim": node.head_dim}, {})


def _rope(node: RoPE, store, input_shape) -> OpEntry:
    return "rope", {}, _rope_tables(node, input_shape[-2])


def _kv_prefix(node: KVPrefix, store, input_shape) -> OpEntry:
    return "kv_prefix", {}, {"cache": _tensor(node.cache, store)}


def _rotation(node: Rotation, store, input_shape) -> OpEntry:
    return "rotation", {}, dict(zip(("before", "left", "right", "after"), (f.numpy() for f in node.factors())))


def _embedding(node: Embedding, store, input_shape) -> OpEntry:
    return "embedding", {}, {"weight": _tensor(node.weight, store)}


def _plain(op: str) -> OpParameters:
    """A node whose op needs no params or arrays."""
    return lambda node, store, input_shape: (op, {}, {})


def _as_op(parameters: OpParameters) -> Lowering:
    return lambda lowering, name, node, producers: lowering.op(name, node, producers, parameters)


def _input(lowering: _Lowering, name: str, node: Input, producers: list[str]) -> dict:
    return lowering.input(name)


def _neuron(lowering: _Lowering, name: str, node: PhaseNeuron, producers: list[str]) -> dict:
    return lowering.neuron(name, node, producers[0])


def _synapse(lowering: _Lowering, name: str, node: Linear, producers: list[str]) -> dict:
    return lowering.synapse(name, node, producers[0])


LOWERINGS: dict[type[IRNode], Lowering] = {
    Input: _input,
    PhaseNeuron: _neuron,
    Linear: _synapse,
    Nonlinear: _as_op(_nonlinear),
    ActivationMatmul: _as_op(_activation_matmul),
    SplitHeads: _as_op(_heads("split_heads")),
    MergeHeads: _as_op(_heads("merge_heads")),
    RoPE: _as_op(_rope),
    KVPrefix: _as_op(_kv_prefix),
    Rotation: _as_op(_rotation),
    Embedding: _as_op(_embedding),
    ElementwiseProduct: _as_op(_plain("product")),
    ResidualAdd: _as_op(_plain("add")),
    Output: _as_op(_plain("output")),
}
"""The lowering of every IR node type (tests/test_lava.py checks that none is missing)."""


def lowering(node: IRNode) -> Lowering:
    """The lowering of `node`'s type; SpikecompileError naming the type if there is none."""
    found = LOWERINGS.get(type(node))
    if found is None:
        raise SpikecompileError(f"the Lava backend has no lowering for {type(node).__name__}")
    return found


def _rope_tables(node: RoPE, length: int) -> dict[str, np.ndarray]:
    """cos and sin [length, head_dim] at positions offset.. (ir.RoPE.tables), as the interpreter builds them."""
    cos, sin = node.tables(length)
    return {"cos": cos.numpy(), "sin": sin.numpy()}


# ---- deployment report ----------------------------------------------------------------------------------------------

def deployment_report(result, part: Graph, formats: Formats, text: TextSource | None, windows: int,
                      seqlen: int | None, allow_saturation: bool, progress: bool = False,
                      fraction_bits: dict | None = None, target: Loihi2 | None = None) -> dict:
    """The part's formats and headroom, its sites' saturations on the stored calibration samples, and the whole
    fixed-point model (payload grids `fraction_bits`, passes.deployment.fitted_fraction_bits; None: not fitted) run
    on `text` (or the model's calibration text): the part's saturations and overflows there (an overflow refused
    unless allow_saturation), and with `text` the perplexity."""
    samples = {site: entry["samples"] for site, entry in result.record["sites"].items() if "samples" in entry}
    report = {"formats": formats_report(part, formats),
              "sample_saturation": sample_saturation(part, formats, samples),
              "payload_grids": payload_grids_entry(formats, fraction_bits)}
    data = text or calibration_text(result.record)
    if data is None:
        report["calibration"] = {"checked": False, "why": f"the calibration text {result.record['calibration']['source']}"
                                                          f" cannot be read; give --text"}
        return report
    length = seqlen or result.record["calibration"]["seqlen"]
    ids = token_windows(result.tokenizer, data, length, windows, "--text" if text else "calibration")
    run = CalibrationRun(result.graph, result.store, deployed_formats(result.graph, result.store, target,
                                                                      fraction_bits))
    ppl = perplexity(run, ids, desc="running the fixed-point model", progress=progress)
    names = set(part) | {formats.sites[name].site for name in formats.sites}
    described = f"{data.name} ({len(ids)} x {length} tokens)"
    calibration = {"checked": True, "data": described, **run.report(lambda name: name in names)}
    check_overflow(calibration["synapses"], allow_saturation, described)
    report["calibration"] = calibration
    if text is not None:
        report["perplexity"] = {"ppl": ppl, "text": data.name, "windows": len(ids), "seqlen": length,
                                "model": "whole model, Loihi 2 fixed point"}
    return report


# ---- reference ----------------------------------------------------------------------------------------------------

def quantized_store(part: Graph, store, bits: int) -> dict[str, Tensor]:
    """The store with the W of every synapse layer (a Linear fed by a spike site) replaced by its fixed-point
    value m·s (hardware.loihi2.quantize_rows: the deployed synapse format)."""
    quantized = dict(store)
    for name in part:
        node = part[name]
        if isinstance(node, Linear) and isinstance(part[part.inputs(name)["x"]], PhaseNeuron):
            mantissa, scale = quantize_rows(node.weight.resolve(store).detach().double().numpy(), bits)
            quantized[node.weight.name] = torch.from_numpy(mantissa * scale[:, None]).float()
    return quantized


def reference_arrays(part: Graph, store, inputs: dict[str, Tensor], quantized) -> dict[str, np.ndarray]:
    """input:<name>; output:<name> and counts:<site> (the spikes per neuron phase_encode gives for the site's
    decoded input) of the decoded part; quantized:<name> and quantized_counts:<site> of the decoded part with
    the fixed-point weights."""
    arrays = {f"input:{name}": value.numpy() for name, value in inputs.items()}
    for output_key, counts_key, weights in (("output", "counts", store), ("quantized", "quantized_counts", quantized)):
        values = evaluate(part, weights, inputs)
        for name in part:
            node = part[name]
            if isinstance(node, Output):
                arrays[f"{output_key}:{name}"] = values[name].numpy()
            elif isinstance(node, PhaseNeuron):
                _, spikes = phase_encode(values[part.inputs(name)["x"]], node.params())
                fired = (spikes != 0).sum(dim=0)  # a signed digit −1 is one spike
                arrays[f"{counts_key}:{node.site}"] = fired.reshape(-1).numpy().astype(np.int64)
    return arrays


# ---- writing ------------------------------------------------------------------------------------------------------

def write_program(folder: str | Path, program: Program, reference: dict[str, np.ndarray], readme_text: str,
                  progress: bool = False) -> None:
    """Write the program folder (created if absent; the files it names replaced), each file atomically;
    progress: a bar per array file on a terminal's stderr."""
    folder = Path(folder)
    try:
        for sub in ("weights", "arrays", PACKAGE):
            (folder / sub).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SpikecompileError(f"{folder}: cannot create the program folder ({error.strerror})") from None
    runtime = resources.files("spikecompile.backends.lava.runtime")
    for file in RUNTIME_FILES:
        text = (runtime / file).read_text(encoding="utf-8")
        atomic_write(folder / PACKAGE / file, lambda temp, text=text: Path(temp).write_text(text, encoding="utf-8"))
    for path, array in bar(program.arrays.items(), desc="lava: write", unit="array", progress=progress):
        atomic_write(folder / path, lambda temp, array=array: _save_npy(temp, array))
    atomic_write(folder / "reference.npz", lambda temp: _save_npz(temp, reference))
    text = json.dumps(program.network, indent=1) + "\n"
    atomic_write(folder / "network.json", lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    atomic_write(folder / "run.py", lambda temp: Path(temp).write_text(RUN_PY, encoding="utf-8"))
    atomic_write(folder / "README.md", lambda temp: Path(temp).write_text(readme_text, encoding="utf-8"))


def _save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as stream:
        np.save(stream, array)


def _save_npz(path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as stream:
        np.savez(stream, **arrays)


# ---- report -------------------------------------------------------------------------------------------------------

def _report(part: Graph, label: str, tokens: int, program: Program, reference: dict[str, np.ndarray]) -> dict:
    processes = program.network["processes"]
    kinds = {kind: sum(entry["kind"] == kind for entry in processes)
             for kind in ("input", "neuron", "synapse", "op", "output")}
    fixed = program.fixed_point
    bounds = {}
    for name in part:
        if isinstance(part[name], Output):
            error = float(np.abs(reference[f"quantized:{name}"] - reference[f"output:{name}"]).max())
            allowance = sum(fixed["synapses"][synapse]["flip_allowance"] for synapse in _output_synapses(part, name))
            bounds[name] = {"weight_error": error, "flip_allowance": allowance, "bound": error + allowance,
                            "max_abs_output": float(np.abs(reference[f"output:{name}"]).max())}
    overflow = [name for name, entry in fixed["synapses"].items()
                if entry["accumulator_peak"] > entry["accumulator_limit"]]
    return {
        "part": label, "tokens": tokens, "steps": program.network["steps"],
        "processes": {**kinds, "lava": len(processes) + kinds["output"]},
        "neurons": sum(entry["size"] for entry in processes if entry["kind"] == "neuron"),
        "synapses": sum(entry["in"] * entry["out"] for entry in processes if entry["kind"] == "synapse"),
        "spikes": {key.removeprefix("counts:"): int(value.sum()) for key, value in reference.items()
                   if key.startswith("counts:")},
        "d_realisation": D_REALISATION,
        "fixed_point": {
            **{key: program.network["fixed_point"][key] for key in ("weight_bits", "state_bits")},
            "bound": bounds, "accumulator_overflow": overflow,
            "max_input_rounding_lsb": max((site["input_rounding"] / site["lsb"] for site in fixed["sites"].values()),
                                          default=0.0),
            "synapses": fixed["synapses"], "sites": fixed["sites"]},
    }


def _output_synapses(part: Graph, output: str) -> list[str]:
    """The synapse layers whose sums reach `output` through no spike site (e.g. o_proj, down_proj)."""
    found, stack, seen = [], [output], set()
    while stack:
        for source in part.inputs(stack.pop()).values():
            node = part[source]
            if source in seen or isinstance(node, PhaseNeuron | Input):
                continue
            seen.add(source)
            if isinstance(node, Linear):
                found.append(source)
            else:
                stack.append(source)
    return sorted(found)


def readme(report: dict) -> str:
    fixed, deployment = report["fixed_point"], report["deployment"]
    exponents = sorted({site["F"] for site in fixed["sites"].values()})
    exponents = f"{exponents[0]}..{exponents[-1]}" if exponents else "none"
    processes = report["processes"]
    budgets = sorted({site["max_spikes"] for site in fixed["sites"].values() if site["max_spikes"]})
    budget = f"sites with K = {', '.join(map(str, budgets))}" if budgets else "no site has a budget"
    return f"""# spikecompile Lava program: {report['part']}

{report['tokens']} tokens (batch 1), {report['steps']} Lava steps; {processes['lava']} Lava processes
({processes['neuron']} phase-neuron sites, {processes['synapse']} synapse layers, {processes['op']} non-spiking ops,
{processes['input']} inputs, {processes['output']} outputs with their sinks); {report['neurons']} neurons,
{report['synapses']} weights (Sparse holds one copy per token). Needs numpy and lava-nc 0.10.0 only (Python 3.11: lava_program/compat.py
fixes lava's one incompatibility in memory at import).

    python run.py                    # floating_pt on the reference input, compared with reference.npz
    python run.py --tag fixed_pt     # the fixed-point models
    python run.py --input x.npz      # your own input: one array per input name, as in reference.npz

## How d(t) is realised
{report['d_realisation']}.

## Time
Lava step k runs event step t = k − start of each process; network.json gives every start. A neuron integrates
its whole input window, then fires its T steps; lava's Dense/Sparse add one step. The output is Σ_t y_t of the
output op, read from its RingBuffer sink.

## Fixed point (fixed_pt): the deployed formats, bit-exact
fixed_pt runs the formats of spikecompile's hardware/loihi2.py (docs/loihi2.md "Deployed formats"), the same
ones `spikecompile build --target sim --numerics loihi2` simulates: the two agree bit for bit on every spike,
every integer potential and every output.
- synapses: {fixed['weight_bits']}-bit signed mantissa m per weight (lava holds 2m, even values in [−256, 254]), one
  scale per output row folded into the receiver's gain; each step's sum A_t = Σ_j 2m_ij·σ_j·D_t·s_j(t) is an exact
  integer, and a row's accumulator holds its window sum Σ_t A_t.
- spikes: a graded payload σ·D_t, D_t = d(t)/δ integers.
- neurons: u = sat(rint(g·Σ_t A_t)) once per window on the site's grid τ·2^-F (F = {exponents}), {fixed['state_bits']}-bit,
  saturating at ±(2^{fixed['state_bits'] - 1} − 1); thresholds θ(t) − v0 and resets h(t) on the same grid; a site with
  max_spikes K fires while its spike count is below K ({budget}).
- ops (norms, softmax, SiLU, products, RoPE, rotations, reshapes, adds): off the neurocores, on the {OP_FORMAT['where']}
  in {OP_FORMAT['format']}, once per window.

## Deployment report
{chr(10).join(deployment_lines(deployment))}
"""
