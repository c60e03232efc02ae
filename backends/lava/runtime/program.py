"""Build and run a spikecompile Lava program (numpy + lava only): network.json and weights/*.npy become Lava
Processes, run under Loihi2SimCfg with the floating_pt or fixed_pt models.

network.json lists processes in order: "input" (a RingBuffer source sending the input at step 0), "neuron"
(processes.PhaseNeuronProcess; "max_spikes" its spike budget, 0 or absent: none), "synapse" (lava Dense for one
token, else Sparse holding one copy of W per token: kron(I_tokens, W)), "op" (processes.Op1/Op2) and "output" (an op
followed by a RingBuffer sink); "connections" as [source, target, input index]. Every value that differs between
the tags is given per tag. A synapse's fixed_pt weights are 2·m, m the stored 8-bit mantissa (lava's mixed-sign
8-bit format: even values in [−256, 254]), so its integer output is Σ 2m·σs and the receiver's gain carries
d(t)·2^(e−1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from . import compat

compat.install()  # before the first lava import

from lava.magma.core.run_conditions import RunSteps
from lava.magma.core.run_configs import Loihi2SimCfg
from lava.proc.dense.process import Dense
from lava.proc.io.sink import PyReceiveModelFloat, RingBuffer as Sink
from lava.proc.io.source import PySendModelFloat, RingBuffer as Source
from lava.proc.sparse.process import Sparse
from lava.utils.weightutils import SignMode
from scipy import sparse  # a dependency of lava-nc

from .processes import MODELS, Op1, Op2, PhaseNeuronProcess

TAGS = ("floating_pt", "fixed_pt")
NETWORK_FILE = "network.json"
REFERENCE_FILE = "reference.npz"


def load(folder: Path) -> dict:
    return json.loads((Path(folder) / NETWORK_FILE).read_text(encoding="utf-8"))


def _synapse(folder: Path, entry: dict, tag: str):
    weights = np.load(folder / entry["weights"][tag])
    weights = 2 * weights.astype(np.int32) if tag == "fixed_pt" else weights.astype(np.float64)
    bits = entry.get("message_bits", {}).get(tag, 2)
    options = {"num_message_bits": bits, "sign_mode": SignMode.MIXED, "name": entry["name"]}
    if entry["tokens"] == 1:
        return Dense(weights=weights, **options)
    return Sparse(weights=sparse.kron(sparse.identity(entry["tokens"], dtype=weights.dtype, format="csr"),
                                      sparse.csr_matrix(weights), format="csr"), **options)


def _op(folder: Path, entry: dict, tag: str):
    params = {**entry["params"], **{key: np.load(folder / path) for key, path in entry["arrays"].items()}}
    kind = Op1 if len(entry["ports"]) == 1 else Op2
    if tag == "fixed_pt":  # the window rule: once, on the window sums (processes.Op)
        fixed = entry["fixed_pt"]
        ports = [{**port, "gain": None, "scale": np.load(folder / port["scale"]) if isinstance(port["scale"], str)
                  else port["scale"]} for port in fixed["ports"]]
        return kind(op=entry["op"], ports=ports, shape=entry["shape"], start=fixed["start"], timesteps=1,
                    params={**params, "window": True}, name=entry["name"])
    ports = [{**port, "gain": port["gain"] and port["gain"][tag]} for port in entry["ports"]]
    return kind(op=entry["op"], ports=ports, shape=entry["shape"], start=entry["start"],
                timesteps=entry["timesteps"], params=params, name=entry["name"])


def _neuron(folder: Path, entry: dict, tag: str, limit: int):
    common = {"size": entry["size"], "threshold": entry["threshold"][tag], "reset": entry["reset"][tag],
              "limit": limit, "max_spikes": entry.get("max_spikes", 0),
              "signed_digits": bool(entry.get("signed_digits", False)), "name": entry["name"]}
    if tag == "fixed_pt":
        fixed = entry["fixed_pt"]
        return PhaseNeuronProcess(**common, gain=[1.0] * fixed["input"]["steps"], input_start=fixed["input"]["start"],
                                  fire_start=fixed["fire_start"], scale=np.load(folder / fixed["gain"]),
                                  payload=fixed["payload"])
    return PhaseNeuronProcess(**common, gain=entry["input"]["gain"][tag], input_start=entry["input"]["start"],
                              fire_start=entry["fire_start"])


def steps_of(network: dict, tag: str) -> int:
    """The Lava steps one run takes under `tag` (fixed_pt has its own schedule: ops once per window)."""
    return network.get(tag, {}).get("steps", network["steps"])


def build(folder: Path, network: dict, tag: str, inputs: dict[str, np.ndarray]):
    """(processes by name, sinks by output name, the instance → ProcessModel map for the run config)."""
    processes, sinks, models = {}, {}, {}
    for entry in network["processes"]:
        name, kind = entry["name"], entry["kind"]
        if kind == "input":
            data = np.zeros((int(np.prod(entry["shape"])), steps_of(network, tag)))
            data[:, 0] = np.asarray(inputs[name], dtype=np.float64).reshape(-1)
            processes[name] = Source(data=data)
            models[processes[name]] = PySendModelFloat
        elif kind == "synapse":
            processes[name] = _synapse(folder, entry, tag)
        elif kind == "neuron":
            processes[name] = _neuron(folder, entry, tag, network["fixed_point"]["state_limit"])
        else:
            processes[name] = _op(folder, entry, tag)
        if type(processes[name]) in MODELS[tag]:
            models[processes[name]] = MODELS[tag][type(processes[name])]
        if kind == "output":
            sinks[name] = Sink(shape=(int(np.prod(entry["shape"])),), buffer=steps_of(network, tag))
            processes[name].y_out.connect(sinks[name].a_in)
            models[sinks[name]] = PyReceiveModelFloat
    for source, target, index in network["connections"]:
        _out_port(processes[source]).connect(_in_port(processes[target], index))
    return processes, sinks, models


def _out_port(process):
    if isinstance(process, Op1 | Op2):
        return process.y_out
    return process.a_out if isinstance(process, Dense | Sparse) else process.s_out


def _in_port(process, index: int):
    if isinstance(process, Op1 | Op2):
        return getattr(process, f"in{index}")
    return process.a_in if isinstance(process, PhaseNeuronProcess) else process.s_in


def run(folder: str | Path, tag: str = "floating_pt", inputs: dict[str, np.ndarray] | None = None) -> dict:
    """Run the program once: {outputs: {name: Σ_t y_t}, counts: {site: spikes per neuron}, saturated: {site:
    fixed_pt saturations}, steps, seconds: {build, compile_and_first_step, steps, total}, steps_per_second (the
    steps after the first)}. inputs default to the reference's."""
    if tag not in TAGS:
        raise ValueError(f"tag {tag!r}: choose one of {', '.join(TAGS)}")
    folder = Path(folder)
    network = load(folder)
    steps = steps_of(network, tag)
    if inputs is None:
        inputs = reference_inputs(folder)
    start = time.perf_counter()
    processes, sinks, models = build(folder, network, tag, inputs)
    built = time.perf_counter()
    first = next(iter(processes.values()))
    neurons = {entry["site"]: processes[entry["name"]] for entry in network["processes"] if entry["kind"] == "neuron"}
    try:  # the first step compiles and starts the processes; the others are the steady state
        first.run(condition=RunSteps(num_steps=1),
                  run_cfg=Loihi2SimCfg(select_tag=tag, exception_proc_model_map=models))
        compiled = time.perf_counter()
        first.run(condition=RunSteps(num_steps=steps - 1),
                  run_cfg=Loihi2SimCfg(select_tag=tag, exception_proc_model_map=models))
        finished = time.perf_counter()
        shapes = {entry["name"]: entry["shape"] for entry in network["processes"]}
        outputs = {name: sink.data.get().sum(axis=-1).reshape(shapes[name]) for name, sink in sinks.items()}
        counts = {site: neuron.count.get().astype(np.int64) for site, neuron in neurons.items()}
        saturated = {site: int(neuron.saturated.get().sum()) for site, neuron in neurons.items()}
        potentials = {site: neuron.u.get().astype(np.int64) for site, neuron in neurons.items()}
        residuals = {site: neuron.r.get().astype(np.int64) for site, neuron in neurons.items()}
    finally:
        first.stop()
    return {"outputs": outputs, "counts": counts, "saturated": saturated, "steps": steps,
            "potentials": potentials, "residuals": residuals,
            "seconds": {"build": built - start, "compile_and_first_step": compiled - built,
                        "steps": finished - compiled, "total": time.perf_counter() - start},
            "steps_per_second": (steps - 1) / (finished - compiled)}


def reference_inputs(folder: Path) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / REFERENCE_FILE) as reference:
        return {key.removeprefix("input:"): reference[key] for key in reference.files if key.startswith("input:")}


def check(folder: Path, tag: str, result: dict) -> list[str]:
    """Lines comparing a run with reference.npz: each output against the float reference and, for fixed_pt,
    the reference with the fixed-point weights; each site's spike counts against those of the same reference."""
    lines = []
    with np.load(Path(folder) / REFERENCE_FILE) as reference:
        for name, output in result["outputs"].items():
            for label in ("output", "quantized") if tag == "fixed_pt" else ("output",):
                expected = reference[f"{label}:{name}"]
                error = float(np.abs(output - expected).max())
                lines.append(f"{name} vs {label} reference: max |error| {error:.3g} "
                             f"({error / max(float(np.abs(expected).max()), 1e-30):.3g} of max |y|)")
        counts_key = "quantized_counts" if tag == "fixed_pt" else "counts"
        differing = {site: int((counts != reference[f"{counts_key}:{site}"]).sum())
                     for site, counts in result["counts"].items()}
    listed = ", ".join(f"{site}: {count}" for site, count in differing.items() if count) or "none"
    lines.append(f"spike counts: {sum(int(c.sum()) for c in result['counts'].values())} spikes; neurons whose count "
                 f"differs from the {counts_key.replace('_', ' ')} reference: {sum(differing.values())} ({listed})")
    return lines


def main(folder: Path) -> None:
    parser = argparse.ArgumentParser(description="Run this spikecompile Lava program under Loihi2SimCfg.")
    parser.add_argument("--tag", choices=TAGS, default="floating_pt")
    parser.add_argument("--input", help="an .npz with one array per program input (default: the reference's)")
    parser.add_argument("--output", default="result.npz", help="where to write outputs and spike counts")
    args = parser.parse_args()
    inputs = dict(np.load(args.input)) if args.input else None
    result = run(folder, args.tag, inputs)
    arrays = {**{f"output:{k}": v for k, v in result["outputs"].items()},
              **{f"counts:{k}": v for k, v in result["counts"].items()},
              **{f"saturated:{k}": v for k, v in result["saturated"].items()},
              **{f"potential:{k}": v for k, v in result["potentials"].items()},
              **{f"residual:{k}": v for k, v in result["residuals"].items()},
              **{f"seconds:{k}": v for k, v in result["seconds"].items()},
              "steps": result["steps"], "steps_per_second": result["steps_per_second"]}
    np.savez(args.output, **arrays)
    seconds = result["seconds"]
    print(f"{args.tag}: {result['steps']} steps in {seconds['total']:.1f} s (build {seconds['build']:.1f} s, compile "
          f"and first step {seconds['compile_and_first_step']:.1f} s, then {result['steps_per_second']:.1f} steps/s); "
          f"fixed_pt saturations: {sum(result['saturated'].values())}; wrote {args.output}")
    if args.input is None:
        print("\n".join(check(folder, args.tag, result)))
