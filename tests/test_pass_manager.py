"""PassManager on toy graphs (networkx DiGraphs) with toy passes: ordering, disabling, checks, errors, timing."""

import logging
from typing import ClassVar
from unittest import mock

import networkx as nx
import pytest

from spikecompile.errors import SpikecompileError
from spikecompile.passes import REGISTRY, Pass, PassManager, PassResult, register_pass


@pytest.fixture(autouse=True)
def clean_registry():
    """Toy passes registered by a test disappear after it."""
    with mock.patch.dict(REGISTRY, clear=True):
        yield


def toy_pass(name, after=(), before=(), run=None, requires=None, ensures=None, options=None):
    """A Pass subclass instance; `run(graph) -> modified` defaults to logging the pass's name on the graph."""

    def default_run(graph):
        graph.graph.setdefault("log", []).append(name)
        return False

    attributes = {"name": name, "description": f"toy pass {name}", "after": after, "before": before,
                  "options": options or {},
                  "run": lambda self, graph, context: PassResult(graph, (run or default_run)(graph), {"pass": name})}
    if requires:
        attributes["requires"] = lambda self, graph: requires(graph)
    if ensures:
        attributes["ensures"] = lambda self, graph: ensures(graph)
    return type(name, (Pass,), attributes)()


def chain():
    graph = nx.DiGraph()
    graph.add_edges_from([("x", "h"), ("h", "y")])
    return graph


def run_names(passes, **kwargs):
    graph, report = PassManager(passes, **kwargs).run(chain())
    return graph.graph.get("log", []), report


def test_order_follows_constraints_and_keeps_given_order_on_ties():
    log, _ = run_names([toy_pass("c", after=("a",)), toy_pass("b"), toy_pass("a"), toy_pass("d", before=("b",))])
    # a before c (after=), d before b (before=); otherwise the given order c, b, a, d is kept as far as possible.
    assert log == ["a", "c", "d", "b"]
    log, _ = run_names([toy_pass("b"), toy_pass("a"), toy_pass("c")])
    assert log == ["b", "a", "c"]


def test_constraint_on_a_pass_outside_the_pipeline_is_vacuous():
    register_pass(type(toy_pass("assign_timesteps")))
    log, _ = run_names([toy_pass("fold", after=("assign_timesteps",))])
    assert log == ["fold"]


def test_cycle_is_one_line_naming_its_passes():
    passes = [toy_pass("a", after=("c",)), toy_pass("b", after=("a",)), toy_pass("c", after=("b",)), toy_pass("d")]
    with pytest.raises(SpikecompileError, match=r"^the after/before constraints of passes a, b, c form a cycle: "
                                                r"a -> b -> c -> a; drop one of them$"):
        PassManager(passes)


def test_unknown_name_in_constraints_lists_valid_names():
    with pytest.raises(SpikecompileError, match=r"unknown pass 'asign' in the `after` of pass b; valid names: a, b$"):
        PassManager([toy_pass("a"), toy_pass("b", after=("asign",))])


def test_disable_by_name_and_registered_names():
    register_pass(type(toy_pass("a")))
    register_pass(type(toy_pass("b")))
    log, report = run_names(["a", "b"], disabled=["a"])
    assert log == ["b"]
    assert [(entry["name"], entry["skipped"]) for entry in report] == [("a", True), ("b", False)]


def test_unknown_disabled_name_lists_valid_names():
    register_pass(type(toy_pass("fold_hadamard")))
    with pytest.raises(SpikecompileError,
                       match=r"^unknown pass 'fold_hadamrd' in the disabled passes; valid names: a, fold_hadamard$"):
        PassManager([toy_pass("a")], disabled=["fold_hadamrd"])


def test_pipeline_names_must_be_registered_and_unique():
    register_pass(type(toy_pass("a")))
    with pytest.raises(SpikecompileError, match=r"^unknown pass 'b' in the pipeline; valid names: a$"):
        PassManager(["a", "b"])
    with pytest.raises(SpikecompileError, match=r"^pass a appears twice in the pipeline$"):
        PassManager(["a", toy_pass("a")])


def test_registering_a_name_twice_is_refused():
    register_pass(type(toy_pass("a")))
    with pytest.raises(ValueError, match="registered twice"):
        register_pass(type(toy_pass("a")))


def test_declaration_slip_is_caught():
    with pytest.raises(TypeError, match="`after` must be a tuple"):
        PassManager([toy_pass("b", after="a")])


def timestepped(graph):
    """A toy precondition: every node carries a timestep."""
    missing = [node for node, data in graph.nodes(data=True) if "t" not in data]
    if missing:
        raise ValueError(f"nodes without a timestep: {', '.join(missing)}")


def assign_timesteps(graph):
    nx.set_node_attributes(graph, 0, "t")
    return True


def test_requires_names_the_pass_the_passes_before_and_the_disabled_one():
    passes = [toy_pass("normalize"), toy_pass("assign_timesteps", run=assign_timesteps, ensures=timestepped),
              toy_pass("fold_hadamard", after=("assign_timesteps",), requires=timestepped)]
    assert run_names(passes)[0] == ["normalize", "fold_hadamard"]  # assign_timesteps logs nothing
    with pytest.raises(SpikecompileError) as raised:
        run_names(passes, disabled=["assign_timesteps"])
    assert str(raised.value) == ("in pass fold_hadamard, after [normalize]: requires failed: ValueError: "
                                 "nodes without a timestep: x, h, y (disabled: assign_timesteps)")
    assert isinstance(raised.value.__cause__, ValueError)


def test_requires_returning_false():
    with pytest.raises(SpikecompileError, match=r"^in pass b, after \[a\]: requires failed$"):
        run_names([toy_pass("a"), toy_pass("b", requires=lambda graph: False)])


def test_ensures_violation_names_the_pass():
    broken = toy_pass("assign_timesteps", run=lambda graph: True, ensures=timestepped)
    with pytest.raises(SpikecompileError, match=r"^in pass assign_timesteps, after \[a\]: ensures failed: "
                                                r"ValueError: nodes without a timestep: x, h, y$"):
        run_names([toy_pass("a"), broken, toy_pass("c")])


def acyclic(graph):
    return nx.is_directed_acyclic_graph(graph)


def test_invariant_failure_names_the_pass_that_broke_it():
    def add_loop(graph):
        graph.add_edge("y", "x")
        return True

    passes = [toy_pass("a"), toy_pass("b"), toy_pass("loop", run=add_loop), toy_pass("c")]
    with pytest.raises(SpikecompileError, match=r"^in pass loop, after \[a, b\]: invariant acyclic failed$"):
        run_names(passes, invariants=[acyclic])


def test_invalid_input_graph_blames_no_pass():
    graph = chain()
    graph.add_edge("y", "x")
    with pytest.raises(SpikecompileError, match=r"^in the input graph, before any pass: invariant acyclic"):
        PassManager([toy_pass("a")], invariants=[acyclic]).run(graph)


def test_exception_in_a_pass_is_one_line_with_the_original_as_cause():
    def crash(graph):
        raise KeyError("weight\nof node h")

    with pytest.raises(SpikecompileError) as raised:
        run_names([toy_pass("a"), toy_pass("b"), toy_pass("crash", run=crash)])
    assert str(raised.value) == "in pass crash, after [a, b]: KeyError: 'weight\\nof node h'"
    assert isinstance(raised.value.__cause__, KeyError)


def test_run_must_return_a_pass_result():
    wrong = toy_pass("wrong")
    wrong.run = lambda graph, context: graph
    with pytest.raises(SpikecompileError, match=r"^in pass wrong, after \[\]: run returned DiGraph"):
        PassManager([wrong]).run(chain())


def test_report_times_every_pass_and_logs_it(caplog):
    with caplog.at_level(logging.INFO, logger="spikecompile.passes.manager"):
        _, report = run_names([toy_pass("a"), toy_pass("b")], disabled=["b"])
    assert [entry["name"] for entry in report] == ["a", "b"]
    assert set(report[0]) == {"name", "iteration", "seconds", "modified", "notes", "skipped"}
    assert report[0]["seconds"] >= 0 and report[0]["notes"] == {"pass": "a"} and not report[0]["skipped"]
    assert report[1]["skipped"] and report[1]["seconds"] == 0.0
    assert "pass a:" in caplog.text and "pass b skipped (disabled)" in caplog.text


def prune_one(graph):
    """Remove one leaf while there are more than two nodes: modifies the graph on each of the first runs only."""
    if graph.number_of_nodes() <= 2:
        return False
    graph.remove_node(next(node for node in graph if graph.out_degree(node) == 0))
    return True


def test_fixed_point_repeats_until_nothing_changes():
    graph = nx.path_graph(6, create_using=nx.DiGraph)
    passes = [toy_pass("prune", run=prune_one), toy_pass("count")]
    graph, report = PassManager(passes, fixed_point=True).run(graph)
    assert graph.number_of_nodes() == 2
    # Four iterations remove a node each (6 -> 2); the fifth changes nothing and ends the loop.
    assert max(entry["iteration"] for entry in report) == 5
    assert [entry["modified"] for entry in report if entry["name"] == "prune"] == [True] * 4 + [False]
    assert graph.graph["log"] == ["count"] * 5


def test_without_fixed_point_the_pipeline_runs_once():
    _, report = PassManager([toy_pass("prune", run=prune_one)]).run(nx.path_graph(6, create_using=nx.DiGraph))
    assert [entry["iteration"] for entry in report] == [1]


def test_fixed_point_is_bounded():
    with pytest.raises(SpikecompileError, match=r"^passes did not reach a fixed point in 3 iterations; "
                                                r"still modifying the graph: grow$"):
        run_names([toy_pass("a"), toy_pass("grow", run=lambda graph: True)], fixed_point=True, max_iterations=3)


def test_errors_in_later_iterations_say_which_iteration():
    def fail_on_third(graph):
        graph.graph["runs"] = graph.graph.get("runs", 0) + 1
        if graph.graph["runs"] == 3:
            raise RuntimeError("boom")
        return True

    with pytest.raises(SpikecompileError, match=r"^in pass b \(iteration 3\), after \[a\]: RuntimeError: boom$"):
        run_names([toy_pass("a"), toy_pass("b", run=fail_on_third)], fixed_point=True)


def sites_option(value):
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict of site name -> scale, got {type(value).__name__}")
    return {site: float(scale) for site, scale in value.items()}


def test_options_are_parsed_and_reach_the_pass():
    seen = {}

    class Scale(Pass):
        name = "scale"
        description = "records its options"
        options: ClassVar = {"sites": sites_option, "bits": int}

        def run(self, graph, context):
            seen.update(context.options, shared=context.shared)
            return PassResult(graph, False)

    PassManager([Scale()], options={"scale": {"sites": {"final_norm": "1.5"}, "bits": "8"}}).run(chain(), shared="tgt")
    assert seen == {"sites": {"final_norm": 1.5}, "bits": 8, "shared": "tgt"}


def test_option_errors_name_the_pass_and_option_before_anything_runs():
    ran = []
    passes = [toy_pass("first", run=lambda graph: ran.append(1)), toy_pass("scale", options={"sites": sites_option})]
    with pytest.raises(SpikecompileError, match=r"^pass scale has no option 'site'; valid options: sites$"):
        PassManager(passes, options={"scale": {"site": {}}})
    with pytest.raises(SpikecompileError, match=r"^pass scale option 'sites': TypeError: expected a dict of site "
                                                r"name -> scale, got list$"):
        PassManager(passes, options={"scale": {"sites": []}})
    with pytest.raises(SpikecompileError, match=r"^unknown pass 'scal' in the pass options; valid names: first, scale$"):
        PassManager(passes, options={"scal": {}})
    assert ran == []
