"""The IR, NIR and model.pt readers under fuzzing, and the reader findings of issue 18 one by one.

Real files are written once from the tiny random LLaMA (converted with the CLI, built, written as an IR folder
with its weights, and its first attention block exported to NIR); every case damages a copy of them — bytes
flipped, files cut short, lines of graph.json deleted, JSON fields deleted or replaced by absurd values or values
of another type, a segment's node record edited — and reads it back. Each case asserts: no exception but
SpikecompileError, and that one line; no case longer than 5 s; a deleted required field never accepted.

The default run tries 500 cases (derandomized: the same cases on every run); `pytest -m slow` runs 10,000.
"""

import contextlib
import copy
import dataclasses
import faulthandler
import hashlib
import io
import json
import math
import re
import shutil
import signal

import pytest
import torch
from conftest import convert_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spikecompile import ir, modelfile
from spikecompile.build import BuildOptions, build
from spikecompile.errors import SpikecompileError

nir = pytest.importorskip("nir", reason="the NIR backend needs the nir extra: pip install 'spikecompile[nir]'")
from spikecompile.backends.nir import export as nir_export  # noqa: E402
from spikecompile.backends.nir import read as nir_read  # noqa: E402

CASE_SECONDS = 5
DEFAULT_CASES = {"ir": 250, "nir": 100, "model": 150}  # 500 in all
SLOW_CASES = {kind: count * 20 for kind, count in DEFAULT_CASES.items()}  # 10,000 in all

ABSURD = [-1e308, 1e308, 1e23, 10**23, -1, 0, 2**31, 2**63, 1e-320, math.nan, math.inf, -math.inf, "", "x", None,
          True, False, [], {}, [0, 0], [[]], {"tensor": "missing"}, {"name": "x", "shape": [], "dtype": "float32"}]
"""Replacement values: absurd magnitudes, non-finite numbers, and values of every JSON type."""


class Hang(BaseException):
    """A case ran past CASE_SECONDS (a BaseException, so no reader's `except Exception` turns it into ours)."""


@contextlib.contextmanager
def at_most(seconds: float):
    """Fail a case that runs longer than `seconds`; a hang inside C code, where no signal handler runs, ends the
    process (with every thread's traceback) at 3× the time."""
    def expire(signum, frame):
        raise Hang(f"a case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(3 * seconds, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the real files -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The bytes of a real model.pt, IR folder (with weights) and NIR export (attention block 0)."""
    root = tmp_path_factory.mktemp("fuzz")
    model = convert_tiny(root)
    result = build(model, BuildOptions())
    ir.write(result.graph, root / "ir", result.store)
    nir_export(ir.decoder_block(result.graph, 0, "attn"), result.store, root / "nir")
    files = {kind: {str(path.relative_to(root / kind)): path.read_bytes()
                    for path in (root / kind).rglob("*") if path.is_file()} for kind in ("ir", "nir")}
    files["model"] = {"model.pt": model.read_bytes()}
    return {"files": files, "payload": torch.load(model, weights_only=True), "root": root}


def write_case(root, files: dict[str, bytes]):
    """A fresh folder holding `files` (relative path → bytes)."""
    folder = root / "case"
    shutil.rmtree(folder, ignore_errors=True)
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def json_paths(value, path=()):
    """Every path (keys and indices) into a JSON-like value, leaves and containers alike."""
    paths = [path] if path else []
    if isinstance(value, dict):
        for key, item in value.items():
            paths += json_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += json_paths(item, (*path, index))
    return paths


def swapped(value):
    """`value` as another type: a number as a string or a bool, a string as a number, a list as an object..."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return 1.5
    if isinstance(value, list):
        return dict(enumerate(value))
    if isinstance(value, dict):
        return list(value.values())
    return "null"


def mutate_json(data, document, paths):
    """Apply one drawn edit to `document` in place: delete, replace with an absurd value, or swap the type, at a
    drawn path. Returns the path of a deleted object key (None for other edits)."""
    path = data.draw(st.sampled_from(paths), label="path")
    *parent_path, key = path
    parent = document
    for step in parent_path:
        parent = parent[step]
    edit = data.draw(st.sampled_from(["delete", "absurd", "swap"]), label="edit")
    if edit == "delete":
        del parent[key]
        return path if isinstance(parent, dict) else None
    parent[key] = data.draw(st.sampled_from(ABSURD), label="value") if edit == "absurd" else swapped(parent[key])
    return None


def damage_bytes(data, blob: bytes) -> bytes:
    """Bytes flipped (1 to 8 of them), or the file cut short, at drawn places."""
    if not blob or data.draw(st.booleans(), label="truncate"):
        return blob[:data.draw(st.integers(0, max(len(blob) - 1, 0)), label="length")]
    damaged = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        damaged[data.draw(st.integers(0, len(blob) - 1), label="at")] ^= data.draw(st.integers(1, 255), label="xor")
    return bytes(damaged)


def expect_only_our_error(read, required_deleted=None):
    """Run `read`: it may succeed or raise one line of SpikecompileError, nothing else, within CASE_SECONDS; a
    deleted required field (its path) must raise."""
    try:
        with at_most(CASE_SECONDS):
            read()
    except SpikecompileError as error:
        assert "\n" not in str(error), str(error)
        return
    assert required_deleted is None, f"deleting {'.'.join(map(str, required_deleted))} was accepted"


# --- the IR reader ------------------------------------------------------------------------------------------------

def _read_ir(folder):
    graph = ir.read(folder)
    ir.read_weights(folder, graph)


def _required_in_ir(path) -> bool:
    """Every key of graph.json is required but the header's weights_sha256 and the keys inside a RoPE's free-form
    `parameters` record (what transformers derived inv_freq from; inv_freq is what runs)."""
    return path != ("weights_sha256",) and "parameters" not in path


def fuzz_ir(data, samples):
    files = dict(samples["files"]["ir"])
    graph_text = files["graph.json"].decode()
    how = data.draw(st.sampled_from(["json", "json", "json", "line", "graph bytes", "tensors", "weights"]),
                    label="how")
    deleted = None
    if how == "json":
        document = json.loads(graph_text)
        deleted = mutate_json(data, document, samples.setdefault("ir paths", json_paths(document)))
        files["graph.json"] = json.dumps(document).encode()
    elif how == "line":
        lines = graph_text.splitlines(keepends=True)
        del lines[data.draw(st.integers(0, len(lines) - 1), label="line")]
        files["graph.json"] = "".join(lines).encode()
    elif how == "graph bytes":
        files["graph.json"] = damage_bytes(data, files["graph.json"])
    else:  # a tensors file damaged, and, mostly, its sha256 in graph.json updated so the damage reaches safetensors
        name = f"{how}.safetensors"
        files[name] = damage_bytes(data, files[name])
        if data.draw(st.integers(0, 3), label="fix sha256"):
            document = json.loads(graph_text)
            document[f"{how}_sha256"] = sha256(files[name])
            files["graph.json"] = json.dumps(document).encode()
    folder = write_case(samples["root"], files)
    expect_only_our_error(lambda: _read_ir(folder), deleted if deleted and _required_in_ir(deleted) else None)


# --- the NIR reader ---------------------------------------------------------------------------------------------

def _with_sha256(files, path):
    manifest = json.loads(files["manifest.json"])
    manifest["files"][path] = sha256(files[path])
    files["manifest.json"] = json.dumps(manifest).encode()


def _edited_segment(data, samples, files, path):
    """A segment whose node record (the spikecompile.ir metadata of one NIR node) had one drawn JSON edit; the
    path of a deleted key of its fields (required), or None."""
    segment = nir.read(samples["root"] / "nir" / path)
    carriers = sorted(name for name, node in segment.nodes.items() if "spikecompile.ir" in node.metadata)
    carrier = segment.nodes[data.draw(st.sampled_from(carriers), label="carrier")]
    record = json.loads(carrier.metadata["spikecompile.ir"])
    deleted = mutate_json(data, record, json_paths(record))
    carrier.metadata["spikecompile.ir"] = json.dumps(record)
    temp = samples["root"] / "segment.nir"
    nir.write(temp, segment, compression=None)
    files[path] = temp.read_bytes()
    _with_sha256(files, path)
    return deleted if deleted and "parameters" not in deleted else None


def fuzz_nir(data, samples):
    files = dict(samples["files"]["nir"])
    segments = sorted(path for path in files if path.endswith(".nir"))
    how = data.draw(st.sampled_from(["manifest", "manifest", "manifest", "segment bytes", "segment record", "ops",
                                     "manifest bytes"]), label="how")
    deleted = None
    if how == "manifest":
        manifest = json.loads(files["manifest.json"])
        paths = samples.setdefault("nir paths", json_paths(manifest))
        deleted = mutate_json(data, manifest, paths)
        files["manifest.json"] = json.dumps(manifest).encode()
        # every key is required but those inside `specs` (documentation) and a RoPE's parameters
        deleted = deleted if deleted and deleted[0] != "specs" and "parameters" not in deleted else None
    elif how == "manifest bytes":
        files["manifest.json"] = damage_bytes(data, files["manifest.json"])
    elif how == "segment record":
        deleted = _edited_segment(data, samples, files, data.draw(st.sampled_from(segments), label="segment"))
    else:
        path = "ops.safetensors" if how == "ops" else data.draw(st.sampled_from(segments), label="segment")
        files[path] = damage_bytes(data, files[path])
        if data.draw(st.integers(0, 3), label="fix sha256"):  # mostly: so the damage reaches h5py / safetensors
            _with_sha256(files, path)
    folder = write_case(samples["root"], files)
    expect_only_our_error(lambda: nir_read(folder), deleted)


# --- the model.pt reader --------------------------------------------------------------------------------------------

def fuzz_model(data, samples):
    """Today's contract of modelfile.load (its full schema is another change): only our error, a dropped top-level
    key refused."""
    blob = samples["files"]["model"]["model.pt"]
    deleted = None
    if data.draw(st.booleans(), label="bytes"):
        blob = damage_bytes(data, blob)
    else:
        payload = copy.deepcopy(samples["payload"])
        deleted = mutate_json(data, payload, samples.setdefault("model paths", json_paths(payload)))
        stream = io.BytesIO()
        torch.save(payload, stream)
        blob = stream.getvalue()
        required = {"format", "format_version", *modelfile.REQUIRED_KEYS}
        deleted = deleted if deleted and len(deleted) == 1 and deleted[0] in required else None
    folder = write_case(samples["root"], {"model.pt": blob})
    expect_only_our_error(lambda: modelfile.load(folder / "model.pt"), deleted)


FUZZERS = {"ir": fuzz_ir, "nir": fuzz_nir, "model": fuzz_model}


def run_fuzz(kind, samples, examples):
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def case(data):
        FUZZERS[kind](data, samples)

    case()


@pytest.mark.parametrize("kind", DEFAULT_CASES)
def test_reader_under_fuzzing_raises_only_our_error(kind, samples):
    run_fuzz(kind, samples, DEFAULT_CASES[kind])


@pytest.mark.slow
@pytest.mark.parametrize("kind", SLOW_CASES)
def test_reader_under_long_fuzzing_raises_only_our_error(kind, samples):
    run_fuzz(kind, samples, SLOW_CASES[kind])


# --- the findings, one by one ----------------------------------------------------------------------------------------

def copy_of(samples, kind, tmp_path):
    """A copy of the sample `kind` folder (ir / nir) under tmp_path."""
    folder = tmp_path / kind
    for path, data in samples["files"][kind].items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def edit_json(path, edit):
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


def ir_node(document, type_name, **fields):
    """The first node entry of this type (and these field values) in a graph.json document."""
    return next(entry for entry in document["nodes"] if entry["type"] == type_name
                and all(entry["fields"].get(key) == value for key, value in fields.items()))


def refused(read, folder, message):
    """read(folder) fails with exactly one line: `message` (a regex) after the path of the file at fault."""
    with pytest.raises(SpikecompileError) as error:
        read(folder)
    text = str(error.value)
    assert "\n" not in text
    assert re.match(f"{re.escape(str(folder))}/{message}", text), text


@pytest.mark.parametrize("type_name, selector, field", [
    ("Nonlinear", {"function": "rmsnorm"}, "weight"),
    ("Nonlinear", {"function": "rmsnorm"}, "eps"),
    ("ActivationMatmul", {"which": "qk"}, "scaling"),
    ("PhaseNeuron", {}, "max_spikes"),
    ("Linear", {}, "timesteps"),
    ("RoPE", {}, "attention_scaling"),
])
def test_ir_reader_refuses_a_dropped_required_field(samples, tmp_path, type_name, selector, field):
    folder = copy_of(samples, "ir", tmp_path)
    names = []

    def drop(document):
        entry = ir_node(document, type_name, **selector)
        del entry["fields"][field]
        names.append(entry["name"])

    edit_json(folder / "graph.json", drop)
    refused(ir.read, folder, rf"graph\.json: node {re.escape(names[0])}: {type_name} lacks field {field} "
                             r"\(every field is required; build the graph again\)$")


def test_ir_reader_refuses_a_dropped_nested_field(samples, tmp_path):
    folder = copy_of(samples, "ir", tmp_path)
    edit_json(folder / "graph.json", lambda document: ir_node(document, "Linear")["fields"]["weight"].pop("dtype"))
    refused(ir.read, folder, r"graph\.json: node [\w.]+: TensorRef weight lacks field dtype")


ABSURD_FIELDS = [
    ("RoPE", "attention_scaling", -1e308, r"attention_scaling must be a number in \(0, 1e3\], got -1e\+308"),
    ("RoPE", "position_offset", 10**23, r"position_offset must be an int in \[0, 2\*\*31\), got 10{23}"),
    ("RoPE", "position_offset", 1e23, r"position_offset must be an int in \[0, 2\*\*31\), got 1e\+23"),
    ("Nonlinear", "eps", 1e308, r"eps must be a number in \(0, 1\] for rmsnorm and None otherwise, got 1e\+308"),
    ("ActivationMatmul", "scaling", -0.125, r"scaling must be a number in \(0, 1e3\], got -0\.125"),
    ("PhaseNeuron", "max_spikes", 10**9, r"max_spikes must be an int in 0\.\.timesteps \(6\), got 1000000000"),
    ("Linear", "timesteps", 10**9, r"timesteps must be None or an int in 1\.\.1024, got 1000000000"),
]


@pytest.mark.parametrize("type_name, field, value, message", ABSURD_FIELDS,
                         ids=[f"{kind}.{field}={value}" for kind, field, value, _ in ABSURD_FIELDS])
def test_ir_reader_refuses_absurd_values(samples, tmp_path, type_name, field, value, message):
    folder = copy_of(samples, "ir", tmp_path)
    edit_json(folder / "graph.json", lambda document: ir_node(document, type_name)["fields"].update({field: value}))
    refused(ir.read, folder, rf"graph\.json: node [\w.]+: {type_name}: {message}$")


@pytest.mark.parametrize("type_name, field, value, message", ABSURD_FIELDS[:5],
                         ids=[f"{kind}.{field}={value}" for kind, field, value, _ in ABSURD_FIELDS[:5]])
def test_nir_reader_refuses_absurd_values(samples, tmp_path, type_name, field, value, message):
    folder = copy_of(samples, "nir", tmp_path)

    def edit(manifest):
        step = next(step for step in manifest["steps"] if step.get("type") == type_name
                    and (type_name != "Nonlinear" or step["fields"]["function"] == "rmsnorm"))
        step["fields"][field] = value

    edit_json(folder / "manifest.json", edit)
    refused(nir_read, folder, rf"manifest\.json: node [\w.]+: {type_name}: {message}$")


def test_the_node_types_hold_every_producer_to_the_ranges():
    node, _ = ir.RoPE.example()
    with pytest.raises(ValueError, match=r"RoPE: attention_scaling must be a number in \(0, 1e3\]"):
        dataclasses.replace(node, attention_scaling=-1e308)
    with pytest.raises(ValueError, match=r"Nonlinear: eps must be a number in \(0, 1\]"):
        ir.Nonlinear(function="rmsnorm", eps=1e308)


def test_nir_manifest_without_files_is_refused(samples, tmp_path):
    folder = copy_of(samples, "nir", tmp_path)
    edit_json(folder / "manifest.json", lambda manifest: manifest.pop("files"))
    refused(nir_read, folder, r"manifest\.json: files: Field required \(got .*\); export again$")


def test_nir_manifest_with_a_field_of_the_wrong_type_is_refused(samples, tmp_path):
    folder = copy_of(samples, "nir", tmp_path)
    edit_json(folder / "manifest.json", lambda manifest: manifest["steps"][2].update(inputs="layers.0.x"))
    refused(nir_read, folder, r"manifest\.json: steps\.2\.segment\.inputs: Input should be a valid (list|array)")


@pytest.mark.parametrize("variant", [[], {"a": 1}, "other"])
def test_nir_manifest_with_an_unknown_variant_is_refused(samples, tmp_path, variant):
    """The long fuzz's finding: a list (unhashable) as the manifest's variant was a TypeError traceback."""
    folder = copy_of(samples, "nir", tmp_path)
    edit_json(folder / "manifest.json", lambda manifest: manifest.update(variant=variant))
    refused(nir_read, folder, r"manifest\.json: variant .*; this spikecompile reads variants .*: export again$")


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:len(data) // 2], r"OSError: Unable to synchronously open file \(truncated file"),
    (lambda data: data.replace(b"HEAP", b"HEAQ", 1), r"(KeyError|RuntimeError): .*bad local heap signature"),
], ids=["truncated", "heap-signature"])
def test_nir_reader_refuses_a_damaged_segment(samples, tmp_path, damage, message):
    folder = copy_of(samples, "nir", tmp_path)
    segment = "segments/layers.0.q.nir"
    (folder / segment).write_bytes(damage((folder / segment).read_bytes()))
    edit_json(folder / "manifest.json",
              lambda manifest: manifest["files"].update({segment: sha256((folder / segment).read_bytes())}))
    refused(nir_read, folder, rf"segments/layers\.0\.q\.nir: not a readable NIR segment \({message}.*\); "
                              rf"export again$")


def test_nir_record_whose_tensor_does_not_fit_its_shape_is_refused(samples, tmp_path):
    folder = copy_of(samples, "nir", tmp_path)

    def reshape(manifest):
        step = next(step for step in manifest["steps"] if step.get("type") == "PhaseNeuron")
        step["tensors"][f"{step['name']}.tau"]["shape"] = [3]

    edit_json(folder / "manifest.json", reshape)
    refused(nir_read, folder, r"manifest\.json: node layers\.0\.attn_probs: tensor layers\.0\.attn_probs\.tau: "
                              r"RuntimeError: shape '\[3\]' is invalid for input of size 1$")


@pytest.mark.parametrize("edit, message", [
    (lambda document: document["nodes"][2].update(name=""), r"a node name must be a non-empty str, got ''"),
    (lambda document: document["nodes"][2].update(name=document["nodes"][1]["name"]), r"node \S+ is defined twice"),
], ids=["empty-name", "name-twice"])
def test_ir_reader_refuses_bad_node_names(samples, tmp_path, edit, message):
    """Found by the 10,000-case run: Graph's own ValueError escaped the reader."""
    folder = copy_of(samples, "ir", tmp_path)
    edit_json(folder / "graph.json", edit)
    refused(ir.read, folder, rf"graph\.json: {message}$")
