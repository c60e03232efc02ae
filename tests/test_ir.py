"""The IR: every node type (found by introspection) round-trips losslessly through graph.json +
tensors.safetensors; a hand-built MLP block round-trips; inconsistent files give one-line errors naming the
node; writing is deterministic."""

import dataclasses
import json

import pytest
import safetensors.torch
import torch

from spikecompile import ir
from spikecompile.errors import SpikecompileError
from spikecompile.hadamard import describe_hadamard
from spikecompile.neuron import base2_params, golden_signed_base2, initial_potential, phase_quantize, signed_base2_params


def _subclasses(cls):
    for subclass in cls.__subclasses__():
        yield subclass
        yield from _subclasses(subclass)


NODE_CLASSES = sorted(set(_subclasses(ir.IRNode)), key=lambda cls: cls.__name__)


def assert_same_node(a, b):
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        left, right = getattr(a, field.name), getattr(b, field.name)
        if isinstance(left, torch.Tensor):
            assert left.dtype == right.dtype and torch.equal(left, right), field.name
        else:
            assert type(left) is type(right) and left == right, field.name


def assert_same_graph(a, b):
    assert list(a) == list(b)
    assert a.edges() == b.edges()
    for name in a:
        assert_same_node(a[name], b[name])


def example_graph(cls) -> ir.Graph:
    """cls.example() fed by one Input per port, feeding an Output."""
    node, inputs = cls.example()
    graph = ir.Graph()
    graph.add_node("node", node)
    for port, tensor_type in inputs.items():
        graph.add_node(f"input.{port}", ir.Input(shape=tensor_type.shape, dtype=tensor_type.dtype))
        graph.add_edge(f"input.{port}", "node", port)
    if cls is not ir.Output:
        graph.add_node("output", ir.Output())
        graph.add_edge("node", "output")
    return graph


def mlp_block(T=4, hidden=8, intermediate=12) -> ir.Graph:
    """mlp_norm site → gate/up → SiLU → silu site → (⊙ up) → online Hadamard → down_proj_in site → down_proj."""
    def site(name):
        return ir.PhaseNeuron.from_params(name, base2_params(0.5, T, n=2))

    def linear(name, rows, cols):
        return ir.Linear(weight=ir.TensorRef(f"model.layers.0.mlp.{name}.weight", (rows, cols)), timesteps=T)

    graph = ir.Graph()
    nodes = {
        "input": ir.Input(shape=("seq", hidden), dtype="float32"),
        "layers.0.mlp_norm": site("layers.0.mlp_norm"),
        "layers.0.mlp.gate_proj": linear("gate_proj", intermediate, hidden),
        "layers.0.mlp.up_proj": linear("up_proj", intermediate, hidden),
        "layers.0.mlp.act_fn": ir.Nonlinear(function="silu", timesteps=T),
        "layers.0.silu": site("layers.0.silu"),
        "layers.0.mlp.product": ir.ElementwiseProduct(timesteps=T),
        "layers.0.mlp.hadamard": ir.Rotation(n=intermediate, where="online",
                                             construction=describe_hadamard(intermediate), timesteps=T),
        "layers.0.down_proj_in": site("layers.0.down_proj_in"),
        "layers.0.mlp.down_proj": linear("down_proj", hidden, intermediate),
        "output": ir.Output(timesteps=T),
    }
    for name, node in nodes.items():
        graph.add_node(name, node)
    edges = [("input", "layers.0.mlp_norm"), ("layers.0.mlp_norm", "layers.0.mlp.gate_proj"),
             ("layers.0.mlp_norm", "layers.0.mlp.up_proj"), ("layers.0.mlp.gate_proj", "layers.0.mlp.act_fn"),
             ("layers.0.mlp.act_fn", "layers.0.silu"), ("layers.0.silu", "layers.0.mlp.product", "a"),
             ("layers.0.mlp.up_proj", "layers.0.mlp.product", "b"), ("layers.0.mlp.product", "layers.0.mlp.hadamard"),
             ("layers.0.mlp.hadamard", "layers.0.down_proj_in"), ("layers.0.down_proj_in", "layers.0.mlp.down_proj"),
             ("layers.0.mlp.down_proj", "output")]
    for edge in edges:
        graph.add_edge(*edge)
    return graph


def test_registry_holds_every_node_type():
    assert NODE_CLASSES and ir.NODE_TYPES == {cls.__name__: cls for cls in NODE_CLASSES}


@pytest.mark.parametrize("cls", NODE_CLASSES, ids=lambda cls: cls.__name__)
def test_node_type_is_documented_and_has_an_example(cls):
    assert cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(")  # a written docstring, not dataclass's
    assert "example" in vars(cls)


@pytest.mark.parametrize("cls", NODE_CLASSES, ids=lambda cls: cls.__name__)
def test_node_type_round_trips(cls, tmp_path):
    graph = example_graph(cls)
    ir.write(graph, tmp_path / "graph")
    assert_same_graph(graph, ir.read(tmp_path / "graph"))


def test_mlp_block_round_trips(tmp_path):
    graph = mlp_block()
    types = ir.validate(graph)
    assert str(types["layers.0.mlp.product"]) == "[seq, 12] float32"
    assert str(types["output"]) == "[seq, 8] float32"
    ir.write(graph, tmp_path / "mlp")
    assert sorted(path.name for path in (tmp_path / "mlp").iterdir()) == ["graph.json", "tensors.safetensors"]
    owned = safetensors.torch.load_file(tmp_path / "mlp" / "tensors.safetensors")  # the neurons' own, no weights
    assert sorted(owned) == sorted(f"layers.0.{site}.{field}" for site in ("mlp_norm", "silu", "down_proj_in")
                                   for field in ("genotype", "tau", "d", "h", "theta", "v0"))
    read = ir.read(tmp_path / "mlp")
    assert_same_graph(graph, read)
    assert read.inputs("layers.0.mlp.product") == {"a": "layers.0.silu", "b": "layers.0.mlp.up_proj"}


def test_subgraph_by_layer_prefix():
    layer = mlp_block().subgraph("layers.0.mlp.")
    assert list(layer) == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.act_fn",
                           "layers.0.mlp.product", "layers.0.mlp.hadamard", "layers.0.mlp.down_proj"]
    assert layer.edges() == [("layers.0.mlp.gate_proj", "layers.0.mlp.act_fn", None),
                             ("layers.0.mlp.up_proj", "layers.0.mlp.product", "b"),
                             ("layers.0.mlp.product", "layers.0.mlp.hadamard", None)]


def test_writing_is_deterministic(tmp_path):
    ir.write(mlp_block(), tmp_path / "first")
    ir.write(mlp_block(), tmp_path / "second")
    ir.write(ir.read(tmp_path / "first"), tmp_path / "again")
    for name in ("graph.json", "tensors.safetensors"):
        first = (tmp_path / "first" / name).read_bytes()
        assert first == (tmp_path / "second" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def _node(document, name):
    return next(entry for entry in document["nodes"] if entry["name"] == name)


def _edge(document, source, target):
    return next(edge for edge in document["edges"] if edge[:2] == [source, target])


def _set_version(document):
    document["format_version"] = 5


def _unknown_type(document):
    _node(document, "layers.0.mlp.act_fn")["type"] = "Gelu"


def _dangling_edge(document):
    document["edges"].append(["layers.0.mlp.down_proj", "layers.0.mlp.ghost", None])


def _missing_input(document):
    document["edges"].remove(_edge(document, "layers.0.mlp.up_proj", "layers.0.mlp.product"))


def _unknown_port(document):
    _edge(document, "layers.0.mlp.up_proj", "layers.0.mlp.product")[2] = "c"


def _shape_mismatch(document):
    _node(document, "layers.0.mlp.down_proj")["fields"]["weight"]["shape"] = [8, 16]


def _timestep_mismatch(document):
    _node(document, "layers.0.mlp.down_proj")["fields"]["timesteps"] = 5


def _cycle(document):
    _edge(document, "layers.0.mlp_norm", "layers.0.mlp.gate_proj")[0] = "layers.0.mlp.down_proj"


def _invalid_field(document):
    _node(document, "layers.0.mlp.act_fn")["fields"]["eps"] = 1e-5


def _unknown_field(document):
    _node(document, "layers.0.mlp.act_fn")["fields"]["slope"] = 1.0


def _missing_tensor(document):
    _node(document, "layers.0.silu")["fields"]["genotype"]["tensor"] = "layers.0.silu.gene"


def _without_signed_digits(document):  # a version-2 neuron record
    del _node(document, "layers.0.silu")["fields"]["signed_digits"]


def _signed_digits_not_a_bool(document):
    _node(document, "layers.0.silu")["fields"]["signed_digits"] = 1


def _construction_changed(document):
    _node(document, "layers.0.mlp.hadamard")["fields"]["construction"]["k_construction"] = "paley2(q=5)"


@pytest.mark.parametrize("edit, message", [
    (_set_version, r"graph\.json: IR graph format version 5, this spikecompile reads version 4"),
    (_unknown_type, r"node layers\.0\.mlp\.act_fn: unknown node type 'Gelu'"),
    (_dangling_edge, r"edge layers\.0\.mlp\.down_proj → layers\.0\.mlp\.ghost: no node named layers\.0\.mlp\.ghost"),
    (_missing_input, r"node layers\.0\.mlp\.product: ElementwiseProduct lacks input b"),
    (_unknown_port, r"node layers\.0\.mlp\.product: ElementwiseProduct has no input 'c' \(fed by layers\.0\.mlp\.up_proj"),
    (_shape_mismatch, r"node layers\.0\.mlp\.down_proj: Linear: input x is \[seq, 12\] float32, expected \[\.\.\., 16\]"),
    (_timestep_mismatch, r"node layers\.0\.mlp\.down_proj: runs 5 timesteps, but its input layers\.0\.down_proj_in"),
    (_cycle, r"node layers\.0\.mlp\.\w+: on a cycle"),
    (_invalid_field, r"node layers\.0\.mlp\.act_fn: Nonlinear: eps must be a number in \(0, 1\] for rmsnorm and None"),
    (_unknown_field, r"node layers\.0\.mlp\.act_fn: Nonlinear has no field slope"),
    (_missing_tensor, r"node layers\.0\.silu: tensor layers\.0\.silu\.gene is not in tensors\.safetensors"),
    (_without_signed_digits, r"node layers\.0\.silu: PhaseNeuron lacks field signed_digits"),
    (_signed_digits_not_a_bool, r"node layers\.0\.silu: PhaseNeuron: signed_digits must be a bool, got 1"),
    (_construction_changed, r"node layers\.0\.mlp\.hadamard: Rotation: construction .* is not what this spikecompile"),
], ids=lambda value: value.__name__.strip("_") if callable(value) else "")
def test_inconsistent_file_is_refused(tmp_path, edit, message):
    folder = tmp_path / "mlp"
    ir.write(mlp_block(), folder)
    document = json.loads((folder / "graph.json").read_text())
    edit(document)
    (folder / "graph.json").write_text(json.dumps(document))
    with pytest.raises(SpikecompileError, match=message) as error:
        ir.read(folder)
    assert "\n" not in str(error.value)


def test_write_refuses_a_file_in_the_folder_s_place(tmp_path):
    (tmp_path / "graph").write_text("")
    with pytest.raises(SpikecompileError, match="cannot create the graph folder"):
        ir.write(mlp_block(), tmp_path / "graph")


def test_tensors_from_another_write_are_refused(tmp_path):
    ir.write(mlp_block(T=4), tmp_path / "four")
    ir.write(mlp_block(T=6), tmp_path / "six")
    (tmp_path / "four" / "tensors.safetensors").write_bytes((tmp_path / "six" / "tensors.safetensors").read_bytes())
    with pytest.raises(SpikecompileError, match="tensors.safetensors does not belong to this graph.json"):
        ir.read(tmp_path / "four")


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"), ('{"format": "spikecompile.model"}', "not a spikecompile IR graph"),
    ('{"format": "spikecompile.ir", "format_version": 4}', "tensors_sha256 must be a sha256 string"),
    ("[" * 100_000, "nested too deeply"), (b"\xff\xfe{}".decode("latin-1"), "not valid JSON"),
])
def test_foreign_graph_json_is_refused(tmp_path, text, message):
    (tmp_path / "graph.json").write_text(text)
    with pytest.raises(SpikecompileError, match=message):
        ir.read(tmp_path)


def test_validate_refuses_objects_that_are_not_ir_nodes():
    graph = mlp_block()
    graph.add_node("layers.0.mlp.extra", object())
    with pytest.raises(SpikecompileError, match=r"node layers\.0\.mlp\.extra: unknown node type object"):
        ir.validate(graph)


def test_a_neuron_integrates_any_input_window():
    def chain(output_steps):
        graph = ir.Graph()
        graph.add_node("input", ir.Input(shape=("seq", 8), dtype="float32"))
        graph.add_node("act", ir.Nonlinear(function="silu", timesteps=8))
        graph.add_node("layers.0.silu", ir.PhaseNeuron.from_params("layers.0.silu", base2_params(0.5, T=4)))
        graph.add_node("output", ir.Output(timesteps=output_steps))
        for source, target in [("input", "act"), ("act", "layers.0.silu"), ("layers.0.silu", "output")]:
            graph.add_edge(source, target)
        return graph

    ir.validate(chain(4))  # 8 steps into a T = 4 neuron: it integrates the whole window, then fires 4 steps
    with pytest.raises(SpikecompileError, match="node output: runs 8 timesteps, but its input layers.0.silu delivers"):
        ir.validate(chain(8))


def test_phase_neuron_converts_to_and_from_params():
    params = base2_params(0.5, T=6, n=3)
    node = ir.PhaseNeuron.from_params("final_norm", params)
    assert node.kind == "final_norm" and node.timesteps == 6
    assert torch.equal(node.v0, initial_potential(params.tau, 6))
    for name in ("tau", "genotype", "d", "h", "theta"):
        assert torch.equal(getattr(node.params(), name), getattr(params, name))


def test_signed_digit_neuron_keeps_its_flag_through_params_and_graph_json(tmp_path):
    params = signed_base2_params(0.5, T=6, n=2)
    node = ir.PhaseNeuron.from_params("layers.0.silu", params)
    assert node.signed_digits and node.params().signed_digits and not node.is_phase_coded
    graph = ir.Graph()
    graph.add_node("x", ir.Input(shape=("tokens", 4), dtype="float32", timesteps=6))
    graph.add_node("layers.0.silu", node)
    graph.add_node("y", ir.Output(timesteps=6))
    graph.add_edge("x", "layers.0.silu")
    graph.add_edge("layers.0.silu", "y")
    ir.write(graph, tmp_path / "g")
    back = ir.read(tmp_path / "g")["layers.0.silu"]
    assert back.signed_digits is True
    x = torch.linspace(-0.6, 0.6, 1000).reshape(-1, 4)
    assert torch.equal(ir.interpret(graph, {}, {"x": x}), phase_quantize(x, params))
    assert torch.equal(ir.interpret(graph, {}, {"x": x}), golden_signed_base2(x, 0.5, 6)[0])


@pytest.mark.parametrize("build, message", [
    (lambda: ir.PhaseNeuron.from_params("layers.0.gate", base2_params(0.5, T=4)), "must end in a site kind"),
    (lambda: ir.PhaseNeuron.from_params("layers.0.q", base2_params(torch.ones(3), T=4)), "one neuron per site"),
    (lambda: ir.Linear(weight=ir.TensorRef("w", (4, 8)), bias=ir.TensorRef("b", (8,))), "bias must be None or"),
    (lambda: ir.Rotation(n=8, where="online", construction={"n": 8}), "construction .* is not what"),
    (lambda: ir.Nonlinear(function="silu", causal=True), "True only for softmax"),
    (lambda: ir.KVPrefix(which="key", token_ids=(1,), cache=ir.TensorRef("c", (2, 3, 4))), r"\[kv_heads, 1, "),
    (lambda: ir.ActivationMatmul(which="kq"), "which must be 'qk' or 'pv'"),
    (lambda: ir.Output(timesteps=0), "timesteps must be None or an int in 1..1024"),
    (lambda: ir.TensorRef("w", (2, 2), "float24"), "unknown dtype 'float24'"),
])
def test_inconsistent_node_is_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_tensor_refs_resolve_against_a_store():
    ref = ir.TensorRef("model.layers.0.mlp.up_proj.weight", (3, 2))
    store = {ref.name: torch.ones(3, 2)}
    assert torch.equal(ref.resolve(store), torch.ones(3, 2))
    with pytest.raises(SpikecompileError, match="the store holds torch.float32 \\[2, 3\\], the graph expects"):
        ref.resolve({ref.name: torch.ones(2, 3)})
    with pytest.raises(SpikecompileError, match="not in the tensor store"):
        ref.resolve({})


# ---- Graph: the reads and rewrites passes and backends make -------------------------------------------------------

PRODUCT, SILU, UP = "layers.0.mlp.product", "layers.0.silu", "layers.0.mlp.up_proj"


def test_graph_reads_producers_consumers_and_ported_edges():
    graph = mlp_block()
    assert sorted(graph.producers(PRODUCT)) == [UP, SILU]
    assert graph.consumers("layers.0.mlp_norm") == ["layers.0.mlp.gate_proj", UP]  # in the order added
    assert graph.consumers("output") == [] and graph.producers("input") == []
    assert graph.in_edges(PRODUCT) == [(SILU, PRODUCT, "a"), (UP, PRODUCT, "b")]
    assert graph.out_edges("layers.0.mlp_norm") == [("layers.0.mlp_norm", "layers.0.mlp.gate_proj", None),
                                                    ("layers.0.mlp_norm", UP, None)]
    assert graph.has_edge(SILU, PRODUCT) and not graph.has_edge(PRODUCT, SILU) and not graph.has_edge("input", PRODUCT)
    assert "input" in graph and "layers.0.q" not in graph


def test_graph_ancestors_and_descendants_follow_the_edges():
    graph = mlp_block()
    assert graph.ancestors(PRODUCT) == {"input", "layers.0.mlp_norm", "layers.0.mlp.gate_proj", UP,
                                        "layers.0.mlp.act_fn", SILU}
    assert graph.descendants(SILU) == {PRODUCT, "layers.0.mlp.hadamard", "layers.0.down_proj_in",
                                       "layers.0.mlp.down_proj", "output"}
    assert graph.ancestors("input") == set() and graph.descendants("output") == set()


def test_a_copy_is_rewritten_without_touching_the_original():
    graph = mlp_block()
    copied = graph.copy()
    rotation = graph["layers.0.mlp.hadamard"]
    copied.replace("layers.0.mlp.hadamard", dataclasses.replace(rotation, where="offline"))
    assert copied["layers.0.mlp.hadamard"].where == "offline" and graph["layers.0.mlp.hadamard"] is rotation
    assert list(copied) == list(graph) and copied.edges() == graph.edges()  # replace keeps the edges and ports
    assert copied.inputs(PRODUCT) == {"a": SILU, "b": UP}
    ir.validate(copied)
    copied.remove_node("layers.0.mlp.hadamard")
    assert "layers.0.mlp.hadamard" not in copied and "layers.0.mlp.hadamard" in graph
    assert not [edge for edge in copied.edges() if "layers.0.mlp.hadamard" in edge[:2]]
    copied.remove_nodes(["output", "layers.0.mlp.down_proj", "not.a.node"])
    assert len(copied) == len(graph) - 3 and len(graph.edges()) == 11
    with pytest.raises(KeyError):
        copied.replace("output", ir.Output())


def test_induced_keeps_the_graph_order_and_copies_the_nodes():
    graph = mlp_block()
    names = {PRODUCT, SILU, UP, "layers.0.mlp.hadamard", "output"}
    part = graph.induced(sorted(names, reverse=True))
    assert list(part) == [name for name in graph if name in names]
    assert part.edges() == [(UP, PRODUCT, "b"), (SILU, PRODUCT, "a"), (PRODUCT, "layers.0.mlp.hadamard", None)]
    part.replace(UP, ir.Output())
    assert isinstance(graph[UP], ir.Linear)
    part.add_edge("layers.0.mlp.hadamard", "output")
    assert not graph.has_edge("layers.0.mlp.hadamard", "output")


# ---- decoder layers by name ---------------------------------------------------------------------------------------

def residual_stack(layers=3, hidden=8) -> ir.Graph:
    """input → per layer N: post_attention_layernorm → SiLU → mlp_residual (+ the stream) → final norm → output."""
    graph = ir.Graph()
    graph.add_node("input", ir.Input(shape=("seq", hidden), dtype="float32"))
    stream = "input"
    for layer in range(layers):
        norm, act, residual = (f"layers.{layer}.{part}" for part in ("post_attention_layernorm", "mlp.act_fn",
                                                                     "mlp_residual"))
        graph.add_node(norm, ir.Nonlinear(function="rmsnorm", eps=1e-6))
        graph.add_node(act, ir.Nonlinear(function="silu"))
        graph.add_node(residual, ir.ResidualAdd())
        for source, target, port in [(stream, norm, None), (norm, act, None), (stream, residual, "residual"),
                                     (act, residual, "branch")]:
            graph.add_edge(source, target, port)
        stream = residual
    graph.add_node("norm", ir.Nonlinear(function="rmsnorm", eps=1e-6))
    graph.add_node("output", ir.Output())
    graph.add_edge(stream, "norm")
    graph.add_edge("norm", "output")
    return graph


def test_layer_of_reads_the_decoder_layer_from_a_name():
    assert ir.layer_of("layers.12.mlp.down_proj") == 12 and ir.layer_of("layers.0.q") == 0
    assert ir.layer_of("final_norm") is None and ir.layer_of("model.layers.3.mlp") is None
    assert ir.layer_of("layers.x.mlp") is None and ir.layer_of("layers.3") is None
    assert ir.layer_indices(residual_stack(layers=3)) == [0, 1, 2]
    assert ir.layer_indices(mlp_block()) == [0] and ir.layer_indices(ir.Graph()) == []


def test_decoder_layers_run_on_their_own():
    graph = residual_stack(layers=3)
    values = ir.evaluate(graph, {}, {"input": torch.randn(5, 8, generator=torch.Generator().manual_seed(0))})
    part, source = ir.decoder_layers(graph, 1, 2)
    assert source == "layers.0.mlp_residual"
    assert list(part) == [name for name in graph if ir.layer_of(name) in (1, 2)] + ["layers_input", "layers_output"]
    assert part.inputs("layers.1.mlp_residual") == {"residual": "layers_input", "branch": "layers.1.mlp.act_fn"}
    assert part.consumers("layers_input") == ["layers.1.post_attention_layernorm", "layers.1.mlp_residual"]
    assert torch.equal(ir.interpret(part, {}, {"layers_input": values[source]}), values["layers.2.mlp_residual"])
    with pytest.raises(SpikecompileError, match="layers 2..3: not in the graph"):
        ir.decoder_layers(graph, 2, 3)


def test_a_decoder_block_keeps_the_path_from_the_norm_to_the_branch():
    graph = residual_stack(layers=3)
    values = ir.evaluate(graph, {}, {"input": torch.randn(5, 8, generator=torch.Generator().manual_seed(1))})
    block = ir.decoder_block(graph, 1, "mlp")
    assert list(block) == ["layers.1.post_attention_layernorm", "layers.1.mlp.act_fn", "block_input", "block_output"]
    assert torch.equal(ir.interpret(block, {}, {"block_input": values["layers.0.mlp_residual"]}),
                       values["layers.1.mlp.act_fn"])
    with pytest.raises(SpikecompileError, match=r"block attn of layer 1: not in the graph \(layers: 0..2\)"):
        ir.decoder_block(graph, 1, "attn")


# ---- RoPE tables: one computation for the interpreter and the backends --------------------------------------------

def test_rope_tables_are_the_scaled_cos_and_sin_of_position_times_frequency():
    node, _ = ir.RoPE.example()
    node = dataclasses.replace(node, attention_scaling=0.5)
    cos, sin = node.tables(3)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (3, node.head_dim)
    assert torch.equal(node.frequencies(), torch.cat([node.inv_freq, node.inv_freq]))
    positions = torch.arange(node.position_offset, node.position_offset + 3, dtype=torch.float64)[:, None]
    angles = positions * node.frequencies().double()
    assert torch.allclose(cos.double(), 0.5 * angles.cos(), atol=1e-6)
    assert torch.allclose(sin.double(), 0.5 * angles.sin(), atol=1e-6)
    assert torch.equal(cos[:, :2], cos[:, 2:])  # rotate-half: channel j and j + head_dim/2 turn together


def test_removing_an_edge_keeps_both_nodes():
    graph = ir.Graph()
    graph.add_node("x", ir.Input(shape=(1, 4), dtype="float32"))
    graph.add_node("y", ir.Output())
    graph.add_edge("x", "y")
    graph.remove_edge("x", "y")
    assert set(graph) == {"x", "y"} and not graph.has_edge("x", "y") and graph.edges() == []
