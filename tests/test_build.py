"""`spikecompile build --target ir` and `spikecompile inspect`, end to end on converted tiny models."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_same_neurons, convert_tiny

from spikecompile.cli import cli
from spikecompile.errors import SpikecompileError
from spikecompile.conversion.convert import load_spiking_model
from spikecompile.ir import PhaseNeuron, Rotation, interpret, read, read_weights, retyped, sites_off
from spikecompile.passes import CompileInputs, PassManager

SITES_OFF = {PhaseNeuron: sites_off}

def _invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def _ids(length=24, seed=0):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny model converted twice: phase coding (fitted) and las (base 2), both rotated with a prefix."""
    root = tmp_path_factory.mktemp("build")
    return {coding: convert_tiny(root, coding, "--coding", coding) for coding in ("phase", "las")}


def _read(folder):
    graph = read(folder)
    return graph, read_weights(folder, graph)


def test_build_writes_a_folded_graph_that_computes_the_model(models, tmp_path):
    out = tmp_path / "ir"
    result = _invoke("build", models["phase"], "--target", "ir", "-o", out)
    assert result.exit_code == 0, result.output
    assert "pass fold_hadamard" in result.output and "pass assign_grains" not in result.output
    assert {path.name for path in out.iterdir()} == {"graph.json", "tensors.safetensors", "weights.safetensors",
                                                       "build.json"}
    graph, weights = _read(out)
    assert not [name for name in graph if isinstance(graph[name], Rotation) and graph[name].where == "offline"]
    assert all(graph[name].timesteps == 6 for name in graph)
    spiking = load_spiking_model(str(models["phase"]))
    ids = _ids()
    # the float function within 1e-4 (sites off) and the same neurons: the converted model on any CPU (sites on, two
    # computation orders in float32 differ by a flipped spike where a 1-ulp difference crosses a threshold)
    with torch.no_grad(), spiking.sites.all_off():
        expected = spiking.logits(ids)
    assert (interpret(graph, weights, ids, SITES_OFF) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert_same_neurons(graph, spiking.sites)
    report = json.loads((out / "build.json").read_text())
    assert [entry["name"] for entry in report["passes"]] == ["cleanup", "assign_timesteps", "fold_hadamard"]
    assert report["bytes"]["weights.safetensors"] == (out / "weights.safetensors").stat().st_size


def test_disabling_fold_keeps_the_rotations(models, tmp_path):
    out = tmp_path / "ir"
    result = _invoke("build", models["phase"], "-o", out, "--disable-pass", "fold_hadamard")
    assert result.exit_code == 0, result.output
    graph, weights = _read(out)
    offline = [name for name in graph if isinstance(graph[name], Rotation) and graph[name].where == "offline"]
    assert "embed_tokens.output_rotation" in offline
    (folded, folded_weights), _ = _read_built(models["phase"], tmp_path / "folded")
    ids = _ids()
    # sites off: the unfolded graph computes the folded one's float function, and both have the same neurons
    expected = interpret(folded, folded_weights, ids, SITES_OFF)
    assert (interpret(graph, weights, ids, SITES_OFF) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert_same_neurons(graph, folded)
    # sites on, in float64 (as tests/test_smollm2.py: float32 rounding of the folded weights flips spikes that sit on
    # a threshold, differently on each CPU): the unfolded graph folded is the default build's graph, and computes
    # the unfolded one's logits
    graph, weights = retyped(graph, weights, torch.float64)
    refolded, _ = PassManager(["fold_hadamard"]).run(graph, CompileInputs(weights))
    assert sorted(refolded) == sorted(folded)
    expected = interpret(graph, weights, ids)
    assert (interpret(refolded, weights, ids) - expected).abs().max() <= 1e-4 * expected.abs().max()


def _read_built(model, out):
    assert _invoke("build", model, "-o", out).exit_code == 0
    return _read(out), out


def test_site_overrides_from_cli_and_toml(models, tmp_path):
    overrides = tmp_path / "t.toml"
    overrides.write_text('[sites]\n"layers.0.q" = 8\n"layers.0.k" = 8\n"layers.1.q" = 5\n')
    out = tmp_path / "ir"
    result = _invoke("build", models["las"], "-o", out, "--overrides", overrides, "--site-timesteps", "layers.1.q=8",
                     "--site-timesteps", "layers.1.k=8")
    assert result.exit_code == 0, result.output
    graph = read(out)
    assert graph["layers.0.q"].timesteps == 8 and graph["layers.1.q"].timesteps == 8  # the CLI wins over the file
    assert graph["layers.0.self_attn.scores"].timesteps == 8 and graph["layers.0.v"].timesteps == 6


def test_inspect_a_model_file_and_a_built_folder(models, tmp_path):
    (graph, _), out = _read_built(models["phase"], tmp_path / "ir")
    by_file = _invoke("inspect", models["phase"], "--json", tmp_path / "a.json")
    by_folder = _invoke("inspect", out, "--json", tmp_path / "b.json", "--draw", tmp_path / "layer.svg", "--layer", 1)
    assert by_file.exit_code == 0 and by_folder.exit_code == 0, by_file.output + by_folder.output
    sites = [graph[name].site for name in graph if isinstance(graph[name], PhaseNeuron)]
    assert all(site in by_folder.output for site in sites)
    assert (tmp_path / "layer.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    from_file, from_folder = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert from_file["sites"] == from_folder["sites"]


BAD = [
    (["--disable-pass", "fold_hadmard"], "unknown pass 'fold_hadmard'"),
    (["--site-timesteps", "layers.0.qq=8"], "site layers.0.qq: no such spike site.*did you mean"),
    (["--site-timesteps", "layers.0.q=99"], "site layers.0.q: T=99 is outside 4..16"),
    (["-T", "8"], "site .*fitted at T=6 and cannot run at T=8"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_build_input_is_one_line(models, tmp_path, args, message):
    result = _invoke("build", models["phase"], "-o", tmp_path / "ir", *args)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ")
    import re
    assert re.search(message, line), line
    assert not (tmp_path / "ir" / "graph.json").exists()


def test_model_file_of_another_version_is_refused(models, tmp_path):
    record = torch.load(models["phase"], weights_only=True)
    record["format_version"] = 99
    other = tmp_path / "other.pt"
    torch.save(record, other)
    for command in (["build", other, "-o", tmp_path / "ir"], ["inspect", other]):
        result = _invoke(*command)
        assert result.exit_code == 2 and "model format version 99" in result.output


def test_edited_ir_is_refused_by_inspect(models, tmp_path):
    _, out = _read_built(models["phase"], tmp_path / "ir")
    text = (out / "graph.json").read_text()
    (out / "graph.json").write_text(text.replace('"type": "ResidualAdd"', '"type": "Residual"', 1))
    result = _invoke("inspect", out)
    assert result.exit_code == 2 and "unknown node type 'Residual'" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("change", ["dtype", "shape", "missing"])
def test_weights_that_do_not_match_the_graph_are_refused_from_the_header(models, tmp_path, change):
    """read_weights checks every tensor's shape and dtype against the file's header (the sha256 vouches for the
    bytes): a weights file rewritten with one tensor of another dtype or shape, or without it, and its sha256
    recorded in graph.json as if it were the right one, is refused naming that tensor."""
    from safetensors.torch import load_file, save_file

    from spikecompile.files import file_sha256

    _, out = _read_built(models["phase"], tmp_path / "ir")
    tensors = load_file(out / "weights.safetensors")
    name = sorted(tensors)[0]
    if change == "dtype":
        tensors[name] = tensors[name].double()
    elif change == "shape":
        tensors[name] = tensors[name].flatten()[:-1]
    else:
        del tensors[name]
    save_file(tensors, out / "weights.safetensors")
    document = json.loads((out / "graph.json").read_text())
    document["weights_sha256"] = file_sha256(out / "weights.safetensors")
    (out / "graph.json").write_text(json.dumps(document))
    expected = "not in the tensor store" if change == "missing" else "the graph expects"
    with pytest.raises(SpikecompileError, match=f"weights.safetensors: tensor {name}: .*{expected}"):
        read_weights(out, read(out))


def test_the_header_gives_each_tensor_its_own_shape_and_dtype(tmp_path):
    from safetensors.torch import save_file

    from spikecompile.ir.serialize import SAFETENSORS_DTYPES, WeightsFile

    tensors = {f"t.{index}": torch.zeros(index + 1, 2, dtype=dtype)
               for index, dtype in enumerate(SAFETENSORS_DTYPES.values())}
    tensors["empty"] = torch.zeros(0, 3, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "w.safetensors")
    weights = WeightsFile(tmp_path / "w.safetensors")
    assert {name: weights.header(name) for name in weights} == {
        name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}
