"""The IR keeps the source dtype (issue 15): a bf16 conversion builds a bf16 IR, in memory and on disk, and the
simulator and the exporters widen it to float32 for their own arithmetic."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny
from safetensors import safe_open

from spikecompile.cli import cli
from spikecompile.ir import (
    CastStore, PhaseNeuron, interpret, read, read_weights, retyped, sites_off, tensor_refs, widened,
)
from spikecompile.ir.base import torch_dtype

SEQLEN, WINDOWS = 48, 2


def _invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{dtype: (model.pt, its IR folder)}: the tiny model converted in bf16 and in fp32, each built to the IR."""
    root = tmp_path_factory.mktemp("dtypes")
    models = {"bfloat16": convert_tiny(root, "bf16", "--dtype", "bfloat16"), "float32": convert_tiny(root, "fp32")}
    folders = {}
    for dtype, model in models.items():
        folders[dtype] = root / f"{dtype}-ir"
        result = _invoke("build", model, "--target", "ir", "-o", folders[dtype], "--no-progress")
        assert result.exit_code == 0, result.output
    return root, models, folders


def test_a_bf16_conversion_builds_a_bf16_ir_on_disk(built):
    _, _, folders = built
    graph = read(folders["bfloat16"])
    refs = [ref for ref in tensor_refs(graph).values() if torch_dtype(ref.dtype).is_floating_point]
    assert refs and {ref.dtype for ref in refs} == {"bfloat16"}
    with safe_open(folders["bfloat16"] / "weights.safetensors", "pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"BF16"}
    sizes = {dtype: (folder / "weights.safetensors").stat().st_size for dtype, folder in folders.items()}
    assert sizes["bfloat16"] < 0.52 * sizes["float32"]
    loaded = read_weights(folders["bfloat16"], graph)
    assert all(loaded[ref.name].dtype == torch.bfloat16 for ref in refs)


def test_the_bf16_ir_computes_the_fp32_irs_function(built):
    _, _, folders = built
    graphs = {dtype: read(folder) for dtype, folder in folders.items()}
    stores = {dtype: read_weights(folders[dtype], graph) for dtype, graph in graphs.items()}
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    off = {PhaseNeuron: sites_off}
    expected = interpret(graphs["float32"], stores["float32"], ids, off)
    native = interpret(graphs["bfloat16"], stores["bfloat16"], ids, off)
    assert native.dtype == torch.bfloat16  # the interpreter runs the graph as the bf16 model runs
    wide = interpret(*widened(graphs["bfloat16"], stores["bfloat16"]), ids, off)
    assert wide.dtype == torch.float32
    for logits, bound in ((wide, 5e-3), (native.float(), 1e-2)):  # bf16 keeps 8 bits of each weight
        assert 0 < (logits - expected).abs().max() <= bound * expected.abs().max()


def test_widening_is_a_view_that_casts_each_tensor_when_used(built):
    """widened/retyped copy no weight up front (a 7B model's fp32 copy would be 27 GB): the view hands out each
    tensor cast when it is asked for, keeps writes and deletions to itself, and leaves the store under it as it was."""
    _, _, folders = built
    graph = read(folders["bfloat16"])
    store = read_weights(folders["bfloat16"], graph)
    before = {name: (tensor.dtype, tensor.data_ptr()) for name, tensor in store.items()}
    wide_graph, wide = widened(graph, store)
    assert isinstance(wide, CastStore) and sorted(wide) == sorted(store) and len(wide) == len(store)
    refs = tensor_refs(wide_graph)
    half = [name for name in refs if store[name].dtype == torch.bfloat16]
    assert half and all(refs[name].dtype == "float32" for name in half)
    for name in half:
        assert wide[name].dtype == torch.float32 and torch.equal(wide[name], store[name].float())
        assert refs[name].resolve(wide).dtype == torch.float32
    wide[half[0]] = torch.zeros_like(wide[half[0]])
    del wide[half[1]]
    assert not wide[half[0]].any() and half[1] not in wide and half[1] not in list(wide)
    with pytest.raises(KeyError):
        wide[half[1]]
    assert {name: (tensor.dtype, tensor.data_ptr()) for name, tensor in store.items()} == before
    wide[half[1]] = store[half[1]].float()
    deep_graph, deep = retyped(wide_graph, wide, torch.float64)  # a view of a view: cast on the way, once per use
    name = half[2]
    assert tensor_refs(deep_graph)[name].dtype == "float64" and torch.equal(deep[name], store[name].double())


@pytest.mark.parametrize("target", ["sim", "nir", "onnx"])
def test_backends_widen_a_bf16_ir(built, target):
    root, models, _ = built
    reports = {}
    for dtype, model in models.items():
        out = root / f"{dtype}-{target}"
        extra = (["--text", root / "calib.txt", "--windows", WINDOWS, "--seqlen", SEQLEN, "--mode", "decoded"]
                 if target == "sim" else [])
        result = _invoke("build", model, "--target", target, "-o", out, "--no-progress", *extra)
        assert result.exit_code == 0, result.output
        reports[dtype] = out
    if target == "sim":
        ppl = {dtype: json.loads((out / "sim.json").read_text())["meta"]["ppl"] for dtype, out in reports.items()}
        evaluation = root / "bf16-eval.json"
        result = _invoke("eval", models["bfloat16"], "--ppl", root / "calib.txt", "--seqlen", SEQLEN, "--max-windows",
                         WINDOWS, "--dtype", "bfloat16", "--no-progress", "--json", evaluation)
        assert result.exit_code == 0, result.output
        snn = json.loads(evaluation.read_text())["snn_ppl"]
        assert ppl["bfloat16"] == pytest.approx(ppl["float32"], rel=5e-3)
        assert ppl["bfloat16"] == pytest.approx(snn, rel=5e-3)
    elif target == "nir":
        counts = {dtype: json.loads((out / "fidelity.json").read_text())["counts"] for dtype, out in reports.items()}
        assert counts["bfloat16"] == counts["float32"] and counts["bfloat16"]["exact"] > 2
    else:
        nodes = {dtype: json.loads((out / "onnx.json").read_text())["forms"]["decoded"]["nodes"]
                 for dtype, out in reports.items()}
        assert nodes["bfloat16"] == nodes["float32"]
