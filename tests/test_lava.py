"""The Lava backend: the Python 3.11 import fix (no lava needed), the emitted program (no lava needed), and the
programs run under Loihi2SimCfg against the decoded reference (skipped cleanly where lava-nc is absent)."""

import ast
import dataclasses
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny, requires_smollm2
from test_budget_lowering import zoo_graph
from test_loihi_fixed import EXACT, disagreements, exact_part
from spikecompile.backends.lava import build_lava
from spikecompile.backends.lava.emit import LOWERINGS, select_part
from spikecompile.backends.lava.runtime import compat

from spikecompile.backends.sim.simulate import run
from spikecompile.build import BuildOptions, build
from spikecompile.cli import cli
from spikecompile.errors import SpikecompileError
from spikecompile.hardware.loihi2 import quantize_weights
from spikecompile.ir import NODE_TYPES, Output, PhaseNeuron, retyped
from spikecompile.neuron import phase_encode

requires_lava = pytest.mark.skipif(importlib.util.find_spec("lava") is None,
                                   reason="lava-nc is not installed (scripts/install.sh installs lava-nc 0.10.0)")
FLOAT_TOLERANCE = 1e-6  # of max |y|: Lava's float ops against the simulator's event mode in float64


# ---- the import fix, on a fake module (no lava needed) -----------------------------------------------------------

BROKEN = '''from __future__ import annotations
from dataclasses import dataclass


@dataclass
class ByteEncoder:
    base: int = 0


@dataclass
class CoreEncoder:
    x: ByteEncoder = ByteEncoder()
    y: ByteEncoder = ByteEncoder()  # a comment stays


def where():
    return where.__code__.co_firstlineno
'''


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    """Write `source` as an importable module with a fresh name; return the name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    count = iter(range(1000))

    def write(source: str) -> str:
        name = f"fake_var_model_{next(count)}"
        (tmp_path / f"{name}.py").write_text(source)
        importlib.invalidate_caches()
        return name
    yield write
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, compat.PatchFinder)
                        or finder.module == compat.MODULE]


def test_the_broken_source_fails_on_this_python_and_imports_with_the_fix(fake_module):
    name = fake_module(BROKEN)
    with pytest.raises(ValueError, match="mutable default"):
        importlib.import_module(name)
    name = fake_module(BROKEN)
    compat.install(name)
    compat.install(name)  # once is enough
    assert sum(isinstance(f, compat.PatchFinder) and f.module == name for f in sys.meta_path) == 1
    module = importlib.import_module(name)
    first, second = module.CoreEncoder(), module.CoreEncoder()
    assert first.x == module.ByteEncoder() and first.x is not second.x
    assert module.where() == BROKEN.splitlines().index("def where():") + 1  # line numbers kept


def test_fixed_source_is_left_alone_and_a_missing_pattern_fails_loudly(fake_module):
    fixed = compat.patch_source(BROKEN, "x.py")
    assert compat.patch_source(fixed, "x.py") == fixed
    assert fixed.count("\n") == BROKEN.count("\n") and "a comment stays" in fixed
    name = fake_module("VALUE = 1\n")
    compat.install(name)
    with pytest.raises(ImportError, match=f"{name}.py: the ByteEncoder"):
        importlib.import_module(name)


def test_importing_spikecompile_imports_no_lava():
    code = ("import sys, spikecompile, spikecompile.backends.lava, spikecompile.passes.loihi_mapping;"
            "assert not [m for m in sys.modules if m == 'lava' or m.startswith('lava.')]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_running_without_lava_names_the_install_step(monkeypatch, tmp_path):
    from spikecompile.backends import lava

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "lava" else real(name, *args))
    with pytest.raises(SpikecompileError, match="lava-nc==0.10.0"):
        lava.run_program(tmp_path)


# ---- emitting (no lava needed) ------------------------------------------------------------------------------------

def test_every_node_type_has_a_lowering():
    assert set(LOWERINGS) == set(NODE_TYPES.values())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny model converted (phase coding, T=6, 2 grains, rotated, with a prefix) and built."""
    return build(convert_tiny(tmp_path_factory.mktemp("lava")), BuildOptions())


@pytest.fixture(scope="module")
def zoo_built(built):
    """The tiny model with its sites cycling through the coding zoo (test_budget_lowering.ZOO): spike budgets
    K = 1, 2, T − 1 and v0 negative, ½τ (rate-like) and above the late thresholds."""
    return dataclasses.replace(built, graph=zoo_graph(built.graph))


PARTS = {"mlp": {"layers": [0], "block": "mlp"}, "attn": {"layers": [0], "block": "attn"}, "model": {}}


def _emit(result, root):
    return {name: (root / name, build_lava(result, root / name, tokens=4, **part)) for name, part in PARTS.items()}


@pytest.fixture(scope="module")
def programs(built, tmp_path_factory):
    """Emitted programs by name: the MLP and attention blocks of layer 0, and the whole model."""
    return _emit(built, tmp_path_factory.mktemp("programs"))


@pytest.fixture(scope="module")
def zoo_programs(zoo_built, tmp_path_factory):
    """The same parts of the zoo model."""
    return _emit(zoo_built, tmp_path_factory.mktemp("zoo-programs"))


@pytest.fixture(scope="module")
def sd_built(tmp_path_factory):
    """The tiny model converted with --coding phase-sd (signed-digit neurons: a ±1 graded payload) and built."""
    from test_signed_lowering import signed_built

    return signed_built(tmp_path_factory.mktemp("lava-sd"))


@pytest.fixture(scope="module")
def sd_programs(sd_built, tmp_path_factory):
    """The same parts of the phase-sd model."""
    return _emit(sd_built, tmp_path_factory.mktemp("sd-programs"))


@pytest.fixture(params=["phase", "zoo", "phase-sd"])
def case(request):
    """(the built model, its programs): the phase-coded tiny model, its zoo variant, or the model converted with
    --coding phase-sd."""
    prefix = {"phase": "", "zoo": "zoo_", "phase-sd": "sd_"}[request.param]
    return request.getfixturevalue(f"{prefix}built"), request.getfixturevalue(f"{prefix}programs")


def test_phase_sd_program_marks_its_sites_signed(sd_built, sd_programs):
    network = json.loads((sd_programs["model"][0] / "network.json").read_text())
    neurons = [process for process in network["processes"] if process["kind"] == "neuron"]
    assert neurons and all(process["signed_digits"] for process in neurons)


def test_zoo_program_carries_budgets_and_thresholds_below_zero(zoo_built, zoo_programs):
    network = json.loads((zoo_programs["model"][0] / "network.json").read_text())
    neurons = {entry["site"]: entry for entry in network["processes"] if entry["kind"] == "neuron"}
    graph = zoo_built.graph
    for name in graph:
        node = graph[name]
        if isinstance(node, PhaseNeuron):
            entry = neurons[node.site]
            assert entry["max_spikes"] == node.max_spikes
            assert np.array_equal(np.float32(entry["threshold"]["floating_pt"]), node.params().thresholds().numpy())
    assert {entry["max_spikes"] for entry in neurons.values()} == {0, 1, 2, 5}
    assert any(min(entry["threshold"]["floating_pt"]) < 0 for entry in neurons.values())
    assert any(min(entry["threshold"]["fixed_pt"]) < 0 for entry in neurons.values())


def test_program_folder_is_self_contained(programs):
    folder, report = programs["mlp"]
    assert {path.name for path in folder.iterdir()} == {"README.md", "run.py", "network.json", "weights", "arrays",
                                                        "reference.npz", "lava_program"}
    allowed = {"numpy", "lava", "scipy", "lava_program", *sys.stdlib_module_names}
    for path in [folder / "run.py", *(folder / "lava_program").glob("*.py")]:
        assert _imports(path) <= allowed, path
    assert "How d(t) is realised" in (folder / "README.md").read_text()
    assert report["processes"] == {"input": 1, "neuron": 3, "synapse": 3, "op": 4, "output": 1, "lava": 13}


def _imports(path: Path) -> set[str]:
    """The top-level packages a file imports (relative imports left out)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_schedule_offsets_each_neuron_by_its_input_window_and_each_synapse_by_one_step(programs):
    network = json.loads((programs["mlp"][0] / "network.json").read_text())
    entries = {entry["name"]: entry for entry in network["processes"]}
    norm, gate = entries["layers.0.mlp_norm"], entries["layers.0.mlp.gate_proj"]
    assert norm["input"]["start"] == 0 and norm["fire_start"] == norm["input"]["steps"] - 1
    product = entries["layers.0.mlp.product"]
    assert [port["start"] for port in product["ports"]] == [entries["layers.0.silu"]["fire_start"],
                                                            norm["fire_start"] + 1]
    assert product["start"] == max(port["start"] for port in product["ports"])
    assert network["steps"] == entries["block_output"]["start"] + entries["block_output"]["timesteps"]
    assert gate["tokens"] == 4 and gate["weights"]["fixed_pt"].endswith(".m8.npy")


def test_fixed_point_weights_are_8_bit_with_a_shared_exponent():
    weights = np.array([[0.5, -0.25, 0.003], [-1.0, 0.0, 0.126]])
    mantissa, exponent = quantize_weights(weights, 8)
    assert mantissa.dtype == np.int8 and np.abs(mantissa).max() <= 128 and np.abs(mantissa).max() >= 64
    assert np.abs(weights - mantissa * 2.0 ** exponent).max() <= 2.0 ** (exponent - 1)


@pytest.mark.parametrize(("layers", "block", "message"), [
    ([0, 2], None, "consecutive"), ([0, 1], "mlp", "cut from one layer"), ([0], "ffn", "choose one of attn, mlp"),
    ([7], None, "not in the graph")])
def test_bad_part_is_one_line(built, layers, block, message):
    with pytest.raises(SpikecompileError, match=message):
        select_part(built.graph, layers, block)


# ---- running in Lava ----------------------------------------------------------------------------------------------

def reference(part, store, inputs):
    """What a Lava run must reproduce, from the reference simulator's event mode in float64: the outputs
    {name: y}, each site's spikes per neuron {site: counts} and each site's integrated input window {site: x}."""
    graph, store = retyped(part, store, torch.float64)
    values = {name: torch.from_numpy(value) for name, value in inputs.items()}
    values = {name: value.double() if value.is_floating_point() else value for name, value in values.items()}
    recording = run(graph, store, values, "event")
    outputs = {name: recording.values[name].numpy() for name in graph if isinstance(graph[name], Output)}
    neurons = [name for name in graph if isinstance(graph[name], PhaseNeuron)]
    counts = {graph[name].site: (recording.spikes[name] != 0).sum(0).reshape(-1).numpy() for name in neurons}
    sites = {graph[name].site: recording.values[graph.inputs(name)["x"]].sum(0) for name in neurons}
    return outputs, counts, sites


def _neuron(part, site):
    return next(part[name] for name in part if isinstance(part[name], PhaseNeuron) and part[name].site == site)


def _counts(x, neuron):
    return (phase_encode(x, neuron.params())[1] != 0).sum(dim=0).reshape(-1).numpy()


def run_program(folder: Path, tag: str) -> dict[str, np.ndarray]:
    """Run the emitted run.py in a fresh interpreter where torch and spikecompile cannot be imported."""
    code = ("import sys, runpy; sys.modules['torch'] = sys.modules['spikecompile'] = None;"
            f"sys.argv = ['run.py', '--tag', '{tag}', '--output', 'result-{tag}.npz'];"
            "runpy.run_path('run.py', run_name='__main__')")
    subprocess.run([sys.executable, "-c", code], cwd=folder, check=True, timeout=300, capture_output=True)
    with np.load(folder / f"result-{tag}.npz") as result:
        return dict(result)


def _inputs(folder):
    with np.load(folder / "reference.npz") as data:
        return {key.removeprefix("input:"): data[key] for key in data.files if key.startswith("input:")}


def _part(built, name):
    part = {"mlp": {"layers": [0], "block": "mlp"}, "attn": {"layers": [0], "block": "attn"}, "model": {}}[name]
    return select_part(built.graph, part.get("layers"), part.get("block"))[0]


def _max_error(result, outputs):
    return max(float(np.abs(result[f"output:{name}"] - y).max() / np.abs(y).max()) for name, y in outputs.items())


@requires_lava
@pytest.mark.parametrize("name", ["mlp", "attn", "model"])
def test_floating_pt_equals_the_decoded_reference(case, name):
    built, programs = case
    folder, _ = programs[name]
    part = _part(built, name)
    outputs, counts, sites = reference(part, built.store, _inputs(folder))
    result = run_program(folder, "floating_pt")
    assert _max_error(result, outputs) <= FLOAT_TOLERANCE
    stopped = budgets = 0  # neurons that stop at their budget K where the same neuron without one fires more
    for site, expected in counts.items():
        np.testing.assert_array_equal(result[f"counts:{site}"], expected, err_msg=site)
        neuron = _neuron(part, site)
        if neuron.max_spikes:
            budgets += 1
            assert result[f"counts:{site}"].max() <= neuron.max_spikes, site
            unlimited = _counts(sites[site].float(), dataclasses.replace(neuron, max_spikes=0))
            stopped += int(((result[f"counts:{site}"] == neuron.max_spikes) & (unlimited > neuron.max_spikes)).sum())
    assert stopped > 0 or budgets == 0  # the budget acts in these runs


@requires_lava
@pytest.mark.parametrize("name", ["mlp", "attn", "model"])
def test_fixed_pt_equals_the_fixed_point_simulator_bit_for_bit(case, name):
    """Every spike count, integer potential, residual and output of Lava fixed_pt equals the simulator's
    --numerics loihi2 mode (tests/test_loihi_fixed.py), budgets and thresholds below zero included (zoo)."""
    built, programs = case
    folder, _ = programs[name]
    parts = {"mlp": {"layers": [0], "block": "mlp"}, "attn": {"layers": [0], "block": "attn"}, "model": {}}[name]
    found = disagreements(built, folder, parts)
    assert exact_part(found) == EXACT and found["spike_total"] > 0, found


@pytest.mark.slow
@pytest.mark.smollm2
@requires_smollm2
@requires_lava
def test_smollm2_mlp_block_full_width_equals_the_decoded_reference(smollm2_t8_path, tmp_path):
    smollm2 = build(smollm2_t8_path, BuildOptions())
    folder = tmp_path / "mlp"
    report = build_lava(smollm2, folder, layers=[0], block="mlp", tokens=4)
    assert report["synapses"] == 3 * 576 * 1536
    outputs, counts, _ = reference(select_part(smollm2.graph, [0], "mlp")[0], smollm2.store, _inputs(folder))
    result = run_program(folder, "floating_pt")
    assert _max_error(result, outputs) <= FLOAT_TOLERANCE
    for site, expected in counts.items():
        np.testing.assert_array_equal(result[f"counts:{site}"], expected, err_msg=site)


def test_cli_build_target_lava(tmp_path):
    model = convert_tiny(tmp_path)
    result = CliRunner().invoke(cli, ["build", str(model), "--target", "lava", "-o", str(tmp_path / "mlp"),
                                      "--layers", "1", "--block", "mlp", "--tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "layer 1 mlp block" in result.output and (tmp_path / "mlp" / "run.py").is_file()
    bad = CliRunner().invoke(cli, ["build", str(model), "--target", "lava", "-o", str(tmp_path / "x"), "--layers", "2-1"])
    assert bad.exit_code == 2 and "--layers 2-1: give a layer" in bad.output
