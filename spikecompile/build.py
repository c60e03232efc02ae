"""`spikecompile build`: model.pt → frontend.trace → passes → a BuildResult that a backend writes out as its target
(spikecompile.backends: the IR folder, the simulator's report, NIR, Lava, ONNX).

The model is loaded with its offline rotations left out of the weights (rotations="explicit"), so the traced
graph shows every Hadamard rotation and fold_hadamard is the pass that folds them (disable it to keep them).
The weights keep the dtype the model was converted in (`convert --dtype`): a bf16 conversion gives a bf16 IR.
The pass manager is built, and so every pass name and option checked, before the model is loaded; then model.pt's
site table is read (check_model: site names, the T each site can run at) before the source model is loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .backends import BuildResult
from .errors import SpikecompileError
from .ir import validate

PIPELINE = ("cleanup", "assign_timesteps", "assign_grains", "fold_hadamard")
"""The passes of a build, in order; assign_grains only runs when a grain search is asked for."""


@dataclass(frozen=True)
class BuildOptions:
    """timesteps: one T for every site; site_timesteps: {site: T} (wins over timesteps); grain_search: run
    assign_grains with "darts" (Algorithm 2) or "even" (refit on even splits), None to keep the converted
    genotypes; disabled: pass names to skip; source: the source model's path, if it moved since conversion."""

    timesteps: int | None = None
    site_timesteps: Mapping[str, int] = field(default_factory=dict)
    grain_search: str | None = None
    disabled: tuple[str, ...] = ()
    source: str | None = None


def pass_manager(options: BuildOptions):
    """The manager for these options; SpikecompileError naming an unknown pass, site-T or search option."""
    from .passes import PassManager
    from .passes.grains import SEARCHES

    if options.grain_search is not None and options.grain_search not in SEARCHES:
        raise SpikecompileError(f"--grain-search {options.grain_search!r}: choose one of {', '.join(SEARCHES)}")
    pipeline = [name for name in PIPELINE if name != "assign_grains" or options.grain_search]
    pass_options: dict[str, dict] = {"assign_timesteps": {}}
    if options.timesteps is not None:
        pass_options["assign_timesteps"]["timesteps"] = options.timesteps
    if options.site_timesteps:
        pass_options["assign_timesteps"]["sites"] = dict(options.site_timesteps)
    if options.grain_search:
        pass_options["assign_grains"] = {"search": options.grain_search}
    return PassManager(pipeline, invariants=[validate], disabled=options.disabled, options=pass_options)


def check_model(model_path: str | Path, options: BuildOptions) -> dict:
    """model.pt's record, once every site override names one of its sites and every site can run at the T asked
    for (a fitted neuron only at its own): what needs the site table but not the source model, checked before
    the source model loads. SpikecompileError naming the override (or -T) and the site otherwise."""
    from .conversion.convert import recorded_site_neuron
    from .ir import PhaseNeuron
    from .modelfile import load
    from .passes.timesteps import check_overrides

    record = load(model_path)
    neurons = {}
    for name in record["sites"]:
        try:
            neurons[name] = PhaseNeuron.from_params(name, *recorded_site_neuron(record, name))
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise SpikecompileError(f"{model_path}: site {name} has an invalid neuron ({error})") from None
    check_overrides(neurons, options.site_timesteps, options.timesteps, where=str(model_path))
    return record


def build(model_path: str | Path, options: BuildOptions,
          check_record: Callable[[dict], None] | None = None, progress: bool = False) -> BuildResult:
    """Trace model.pt and run the build passes on it, the source model read one part at a time
    (conversion.layered: the result's store reads each weight when a backend asks for it). check_record(record), if
    given, checks more against model.pt's record (e.g. a backend's options against its layers) before the source
    model is opened. progress: bars on a terminal's stderr for the trace (per decoder layer), and for the parts of
    the source read to compute the prefix's KV cache and by the passes (one step per layer, embedding and head)."""
    from .conversion.convert import recorded_source
    from .conversion.layered import open_converted
    from .frontend import trace
    from .passes import CompileInputs

    manager = pass_manager(options)
    record = check_model(model_path, options)
    if check_record is not None:
        check_record(record)
    seconds = {}
    start = time.perf_counter()
    spiking, store = open_converted(model_path, record, recorded_source(record, model_path, options.source),
                                    source_placement(record))
    seconds["load"] = time.perf_counter() - start
    start = time.perf_counter()
    with store.reading("prefix cache", progress and bool(record["prefix"])):  # trace computes the prefix's KV
        graph, _ = trace(spiking, progress)
    seconds["trace"] = time.perf_counter() - start
    record, tokenizer = spiking.record, spiking.tokenizer
    samples = {name: entry["samples"] for name, entry in record["sites"].items() if "samples" in entry}
    start = time.perf_counter()
    with store.reading("passes", progress):
        graph, report = manager.run(graph, CompileInputs(store, samples, record["conversion"]["seed"],
                                                         release_replaced=True))
    seconds["passes"] = time.perf_counter() - start
    return BuildResult(graph, store, report, seconds, record, tokenizer, str(model_path), _recorded(options))


def source_placement(record: dict):
    """The CPU in the dtype the model was converted in (model.pt's conversion.placement; float32 when it has none):
    the IR's weights stay in the source dtype (bf16/fp16 are not expanded to fp32 in memory or on disk)."""
    from .devices import Placement

    return Placement("cpu", record["conversion"].get("placement", {}).get("dtype", "float32"))


def _recorded(options: BuildOptions) -> dict:
    """The options as build.json records them (site_timesteps a plain dict)."""
    return {**asdict(options), "site_timesteps": dict(options.site_timesteps)}

