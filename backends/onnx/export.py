"""IR graph → standard ONNX models (opset OPSET), one file per form, and onnx.json describing them:

    decoded.onnx   each phase neuron an elementwise quantizer x ↦ x̂ (its T comparisons unrolled; lower.py)
    event.onnx     the T phases explicit: every float value a stack [T, ...] of per-step tensors, each neuron's T
                   spike planes unrolled; with spike_outputs, bool [T, ...] outputs "<neuron>.spikes"
    onnx.json      opset, files and sizes, inputs and outputs, node counts by op, export seconds; written last

Inputs: the graph's Input nodes by name ("input_ids": int64 [batch, seq], batch and seq dynamic), and every KV
prefix cache by its tensor name ("prefix.layers.0.key": [kv_heads, P, head_dim]), an input whose default value
is the stored prefix (an initializer of the same name): leave it out to run the converted model, feed it to run
another prefix of P tokens. Outputs: the Output nodes by name ("logits": [batch, seq, vocab]).

A model whose weights would pass protobuf's 2 GiB limit keeps them in "<form>.onnx.data" (ONNX external data,
offsets aligned to 4 KiB for memory mapping), written before the model. When the graph's own weights already pass
it (any model of a few billion parameters), each initializer goes to the data file as it is made (ExternalData),
so the export holds one tensor at a time, not the model's weights in fp32 (27 GB for 7B); the files are those of
writing the whole model out afterwards. Every file is written atomically and checked with onnx.checker (full
check, from the written file). Writing is deterministic.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import onnx
from onnx import TensorProto, external_data_helper, helper

from ... import __version__
from ...errors import SpikecompileError
from ...files import atomic_write, check_writable
from ...ir import Graph, TensorStore, tensor_refs, validate
from ...progress import bar
from .. import BuildResult, widened_result
from .builder import GraphBuilder
from .lower import FORMS, Context, lowering

OPSET = 17
"""ONNX opset 17 (onnx ≥ 1.12, onnxruntime ≥ 1.12; TensorRT 8.6, OpenVINO 2023): every op used is in it."""
PROTOBUF_LIMIT = 2**31
"""A model file holds at most 2 GiB; weights above PROTOBUF_LIMIT − HEADROOM go to external data."""
HEADROOM = 2**26
DATA_ALIGNMENT = 4096
EXTERNAL_MIN_BYTES = 1024
REPORT_FILE = "onnx.json"
FORM_CHOICES = (*FORMS, "both")


def check_form(form: str) -> tuple[str, ...]:
    """The forms `form` names ("decoded", "event" or "both"); SpikecompileError for any other."""
    if form not in FORM_CHOICES:
        raise SpikecompileError(f"onnx form {form!r}: choose one of {', '.join(FORM_CHOICES)}")
    return FORMS if form == "both" else (form,)


def build_onnx(result: BuildResult, folder: str | Path, form: str = "both", spike_outputs: bool = False,
               progress: bool = True) -> dict:
    """`spikecompile build --target onnx`: export the built graph to `folder` (see export); the report."""
    result = widened_result(result)
    return export(result.graph, result.store, folder, form, spike_outputs, progress)


def export(graph: Graph, store: TensorStore, folder: str | Path, form: str = "both",
           spike_outputs: bool = False, progress: bool = False) -> dict:
    """Write `graph` (weights from `store`) as ONNX models of `form` into `folder` and return the report (also
    written as onnx.json). spike_outputs: the event form also outputs every neuron's spike planes. Every node's
    lowering is looked up before anything is written; one form is held in memory at a time. progress: a bar per
    form on a terminal's stderr, one step per IR node lowered (the write and check that follow are one step)."""
    forms = check_form(form)
    for name in graph:
        lowering(name, graph[name])
    folder = _prepare(folder)
    report = {"format": "spikecompile.onnx", "opset": OPSET, "onnx": onnx.__version__, "spike_outputs": spike_outputs,
              "ir_nodes": len(graph), "forms": {}}
    streamed = weight_bytes(graph) > PROTOBUF_LIMIT - HEADROOM
    for name in forms:
        start = time.perf_counter()
        path = folder / f"{name}.onnx"
        if streamed:  # the weights go to the data file as they are lowered
            data, made = path.with_name(path.name + ".data"), []

            def lower_into(temp, name=name, data=data, made=made):
                with ExternalData(temp, data.name) as external:
                    made.append(to_onnx(graph, store, name, spike_outputs, progress, external=external))

            atomic_write(data, lower_into)
            model = made[0]
        else:
            model = to_onnx(graph, store, name, spike_outputs, progress)
        lowered = time.perf_counter()
        files = write_model(model, path, data_written=streamed)
        report["ir_version"] = model.ir_version
        report["forms"][name] = {**files, **describe(model), "seconds": {
            "lower": lowered - start, "write_and_check": time.perf_counter() - lowered}}
        del model
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(folder / REPORT_FILE, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return report


def weight_bytes(graph: Graph) -> int:
    """Bytes of the weights the graph's TensorRefs name (each once), in their IR dtypes."""
    return sum(ref.nbytes for ref in tensor_refs(graph).values())


def to_onnx(graph: Graph, store: TensorStore, form: str = "decoded", spike_outputs: bool = False,
            progress: bool = False, external: ExternalData | None = None) -> onnx.ModelProto:
    """The ONNX model of `graph` in one form (weights embedded, or with `external` written to its data file as
    they are made); SpikecompileError naming the node at fault. progress: a bar on a terminal's stderr, one step
    per IR node."""
    if form not in FORMS:
        raise SpikecompileError(f"onnx form {form!r}: a model holds one form, {' or '.join(FORMS)}")
    types = validate(graph)
    event = form == "event"
    unassigned = [name for name in graph if graph[name].timesteps is None]
    if event and unassigned:
        raise SpikecompileError(f"node {unassigned[0]}: no timesteps; run the assign_timesteps pass first")
    builder = GraphBuilder(store, external.place if external else None)
    context = Context(builder, {}, event, spike_outputs and event)
    values = {}
    for name in bar(graph.topological_order(), desc=f"onnx {form}: lower", unit="node", progress=progress):
        node = graph[name]
        lower = lowering(name, node)
        builder.scope = name
        inputs = {port: values[source] for port, source in graph.inputs(name).items()}
        try:
            value = lower(context, name, node, inputs)
        except (SpikecompileError, ValueError, RuntimeError) as error:
            raise SpikecompileError(f"node {name}: {type(node).__name__}: {error}") from None
        values[name] = builder.name_output(value, name)
        if value in context.running:  # renamed: its running sums go with it
            context.running[values[name]] = context.running.pop(value)
        context.types[values[name]] = types[name]
    model = helper.make_model(
        helper.make_graph(builder.nodes, f"spikecompile.{form}", builder.inputs, builder.outputs,
                          doc_string=f"spikecompile {__version__}: the spiking model, {form} form"),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="spikecompile", producer_version=__version__)
    model.graph.initializer.extend(builder.initializers.values())  # one copy of the weights, not make_graph's two
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    helper.set_model_props(model, {"spikecompile.form": form, "spikecompile.spike_outputs": str(context.spike_outputs)})
    return model


def write_model(model: onnx.ModelProto, path: Path, data_written: bool = False) -> dict:
    """Write `model` to `path` (its weights to "<path>.data" past the protobuf limit, unless data_written: they are
    there already, ExternalData) and check the written file."""
    data = path.with_name(path.name + ".data")
    external = data_written or sum(len(tensor.raw_data) for tensor in model.graph.initializer) > \
        PROTOBUF_LIMIT - HEADROOM
    if external and not data_written:
        _write_external_data(model, data)
    atomic_write(path, lambda temp: Path(temp).write_bytes(model.SerializeToString()))
    if not external:
        data.unlink(missing_ok=True)  # left by an earlier, larger export
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise SpikecompileError(f"{path}: the written model fails onnx.checker: {str(error).splitlines()[0]}") from None
    files = [path, data] if external else [path]
    return {"file": path.name, "data": data.name if external else None,
            "bytes": sum(file.stat().st_size for file in files)}


def _write_external_data(model: onnx.ModelProto, data: Path) -> None:
    """Move the bytes of every initializer into `data` as ExternalData places them."""

    def write(temp):
        with ExternalData(temp, data.name) as external:
            for tensor in model.graph.initializer:
                external.place(tensor)

    atomic_write(data, write)


class ExternalData:
    """A data file (ONNX external data) that initializers are moved into as they are made: each of
    EXTERNAL_MIN_BYTES or more at the next offset aligned to DATA_ALIGNMENT, its TensorProto left pointing there
    (location: the file's final name). The small ones — shapes, axes, scalars — stay inline, where shape inference
    reads them."""

    def __init__(self, path, location: str):
        self.path, self.location = path, location

    def __enter__(self) -> ExternalData:
        self.stream = open(self.path, "wb")  # noqa: SIM115 (closed on exit)
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()

    def place(self, tensor: TensorProto) -> TensorProto:
        size = len(tensor.raw_data)
        if size < EXTERNAL_MIN_BYTES:
            return tensor
        offset = -(-self.stream.tell() // DATA_ALIGNMENT) * DATA_ALIGNMENT
        self.stream.write(bytes(offset - self.stream.tell()))
        self.stream.write(tensor.raw_data)
        external_data_helper.set_external_data(tensor, self.location, offset, size)
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        return tensor


def describe(model: onnx.ModelProto) -> dict:
    """Inputs (with whether a default value is stored), outputs, node counts by op type, initializer count."""
    graph = model.graph
    stored = {tensor.name for tensor in graph.initializer}
    ops = collections.Counter(node.op_type for node in graph.node)
    return {"inputs": [{"name": given.name, "shape": _dims(given), "default": given.name in stored}
                       for given in graph.input],
            "outputs": [{"name": output.name, "shape": _dims(output)} for output in graph.output],
            "nodes": len(graph.node), "ops": dict(sorted(ops.items())), "initializers": len(graph.initializer)}


def _dims(value: onnx.ValueInfoProto) -> list:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def _prepare(folder: str | Path) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise SpikecompileError(f"{folder}: cannot create the ONNX output folder ({error.strerror})") from None
    check_writable(folder / REPORT_FILE)
    return folder
