"""Pass infrastructure: declared passes, a registry by name, and a manager that orders, runs and checks them.

Modelled on torch.fx's pass infrastructure (requires / run / ensures, invariants checked after every pass, errors
that say which pass failed after which others) and TVM's passes disabled by name. The manager never looks inside
the graph: it works for any graph object, and what "valid" means is given by the caller's invariant callables, so
the IR can change without touching this module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import networkx as nx

from ..errors import SpikecompileError

logger = logging.getLogger(__name__)

Check = Callable[[Any], Any]
"""A requires/ensures hook or an invariant: holds unless it raises or returns False."""


@dataclass(frozen=True)
class PassResult:
    graph: Any
    modified: bool
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PassContext:
    """What a pass sees besides the graph: its validated options, the caller's shared data, the iteration."""

    options: Mapping[str, Any]
    shared: Any = None
    iteration: int = 1


class Pass:
    """One graph transformation, declared once.

    Subclasses set `name` (unique, used by --disable-pass), `description` (one line), ordering constraints
    `after` / `before` (names of passes this one must run after / before, when both are in the pipeline) and
    `options` (option name -> parser that returns the normalized value or raises on a bad one), and implement
    `run`. `requires` and `ensures` are the pre- and postcondition on the graph: each holds unless it raises
    (whose message says what is wrong) or returns False.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}

    def requires(self, graph: Any) -> bool | None:
        return None

    def ensures(self, graph: Any) -> bool | None:
        return None

    def run(self, graph: Any, context: PassContext) -> PassResult:
        raise NotImplementedError

    def parse_options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The options, each normalized by its parser; a one-line error names this pass and the option at fault."""
        parsed = {}
        for option, value in raw.items():
            if option not in self.options:
                valid = ", ".join(sorted(self.options)) or "none"
                raise SpikecompileError(f"pass {self.name} has no option {option!r}; valid options: {valid}")
            try:
                parsed[option] = self.options[option](value)
            except Exception as error:
                raise SpikecompileError(f"pass {self.name} option {option!r}: {_one_line(error)}") from error
        return parsed


REGISTRY: dict[str, type[Pass]] = {}
"""Every registered pass class by name: what the CLI's pass names (--disable-pass, pipelines) refer to."""


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to REGISTRY under its `name`."""
    _check_declaration(cls)
    if REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"pass name {cls.name!r} is registered twice: {REGISTRY[cls.name].__qualname__}, "
                         f"{cls.__qualname__}")
    REGISTRY[cls.name] = cls
    return cls


def _check_declaration(cls: type[Pass]) -> None:
    """Catch declaration slips early, e.g. `after = ("x")`: a str, which would read as one pass per letter."""
    if not (isinstance(cls.name, str) and cls.name.isidentifier()):
        raise TypeError(f"{cls.__qualname__}: `name` must be an identifier such as 'fold_hadamard'")
    if not cls.description or "\n" in cls.description:
        raise TypeError(f"pass {cls.name}: `description` must be one non-empty line")
    for attribute in ("after", "before"):
        names = getattr(cls, attribute)
        if not (isinstance(names, tuple) and all(isinstance(name, str) for name in names)):
            raise TypeError(f"pass {cls.name}: `{attribute}` must be a tuple of pass names")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, SpikecompileError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Unmet(Exception):
    """A check returned False (rather than raising a message of its own)."""


def _hold(check: Check, graph: Any) -> None:
    if check(graph) is False:
        raise _Unmet


def _check_name(check: Check) -> str:
    return getattr(check, "__name__", type(check).__name__)


class PassManager:
    """Orders passes by their after/before constraints, runs them, and checks every invariant after each.

    `passes` are Pass instances or registered names; `disabled` names passes to skip (any registered or
    pipeline name); `options` maps a pass name to its raw options, validated here so a bad option fails
    before any pass runs. With `fixed_point`, the pipeline repeats until no pass modifies the graph, at most
    `max_iterations` times.
    """

    def __init__(self, passes: Iterable[Pass | str], invariants: Iterable[Check] = (),
                 disabled: Iterable[str] = (), options: Mapping[str, Mapping[str, Any]] | None = None,
                 fixed_point: bool = False, max_iterations: int = 10):
        pipeline = [self._resolve(item) for item in passes]
        by_name: dict[str, Pass] = {}
        for pass_ in pipeline:
            _check_declaration(type(pass_))
            if pass_.name in by_name:
                raise SpikecompileError(f"pass {pass_.name} appears twice in the pipeline")
            by_name[pass_.name] = pass_
        known = sorted(REGISTRY.keys() | by_name.keys())
        for pass_ in pipeline:
            for attribute in ("after", "before"):
                for name in getattr(pass_, attribute):
                    _check_known(name, known, f"the `{attribute}` of pass {pass_.name}")
        self.disabled = frozenset(disabled)
        for name in sorted(self.disabled):
            _check_known(name, known, "the disabled passes")
        self.options = {}
        for name, raw in (options or {}).items():
            _check_known(name, sorted(by_name), "the pass options")
            self.options[name] = by_name[name].parse_options(raw)
        if max_iterations < 1:
            raise ValueError("max_iterations must be at least 1")
        self.order = _order(pipeline)
        self.invariants = [(f"invariant {_check_name(check)}", check) for check in invariants]
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations

    @staticmethod
    def _resolve(item: Pass | str) -> Pass:
        if isinstance(item, Pass):
            return item
        _check_known(item, sorted(REGISTRY), "the pipeline")
        return REGISTRY[item]()

    def run(self, graph: Any, shared: Any = None) -> tuple[Any, list[dict]]:
        """Run the pipeline on `graph`; returns the final graph and one report entry per pass per iteration:
        {name, iteration, seconds, modified, notes, skipped}."""
        _verify(self.invariants, graph, "in the input graph, before any pass: ")
        report = []
        for iteration in range(1, self.max_iterations + 1):
            ran: list[str] = []
            modifying: list[str] = []
            for index, pass_ in enumerate(self.order):
                skipped = pass_.name in self.disabled
                if skipped:
                    logger.info("pass %s skipped (disabled)", pass_.name)
                    result, seconds = PassResult(graph, False), 0.0
                else:
                    context = PassContext(self.options.get(pass_.name, {}), shared, iteration)
                    result, seconds = self._step(pass_, graph, context, ran, self.order[:index])
                    logger.info("pass %s: %.3f s, modified: %s", pass_.name, seconds, result.modified)
                    ran.append(pass_.name)
                report.append({"name": pass_.name, "iteration": iteration, "seconds": seconds,
                               "modified": result.modified, "notes": result.notes, "skipped": skipped})
                graph = result.graph
                if result.modified:
                    modifying.append(pass_.name)
            if not self.fixed_point or not modifying:
                return graph, report
        raise SpikecompileError(f"passes did not reach a fixed point in {self.max_iterations} iterations; "
                                f"still modifying the graph: {', '.join(modifying)}")

    def _step(self, pass_: Pass, graph: Any, context: PassContext, ran: list[str],
              earlier: tuple[Pass, ...]) -> tuple[PassResult, float]:
        """Run one pass between its checks; any failure becomes one line naming the pass and those run before."""
        # No "error" here: the CLI prints every message after "error: ".
        where = f"in pass {pass_.name}" + (f" (iteration {context.iteration})" if context.iteration > 1 else "")
        where += f", after [{', '.join(ran)}]: "
        try:
            _hold(pass_.requires, graph)
        except Exception as error:
            # A precondition usually fails because the pass that establishes it was disabled: say which were.
            skipped = [p.name for p in earlier if p.name in self.disabled]
            hint = f" (disabled: {', '.join(skipped)})" if skipped else ""
            raise SpikecompileError(where + _failure("requires", error) + hint) from error
        start = time.perf_counter()
        try:
            result = pass_.run(graph, context)
        except Exception as error:
            raise SpikecompileError(where + _one_line(error)) from error
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise SpikecompileError(where + f"run returned {type(result).__name__}, expected a PassResult")
        _verify([("ensures", pass_.ensures)] + self.invariants, result.graph, where)
        return result, seconds


def _failure(label: str, error: Exception) -> str:
    return f"{label} failed" if isinstance(error, _Unmet) else f"{label} failed: {_one_line(error)}"


def _verify(checks: list[tuple[str, Check]], graph: Any, where: str) -> None:
    for label, check in checks:
        try:
            _hold(check, graph)
        except Exception as error:
            raise SpikecompileError(where + _failure(label, error)) from error


def _check_known(name: str, known: list[str], where: str) -> None:
    if name not in known:
        raise SpikecompileError(f"unknown pass {name!r} in {where}; valid names: {', '.join(known) or 'none'}")


def _order(pipeline: list[Pass]) -> tuple[Pass, ...]:
    """Topological order of the after/before constraints; ties keep the pipeline's order."""
    position = {pass_.name: index for index, pass_ in enumerate(pipeline)}
    constraints = nx.DiGraph()
    constraints.add_nodes_from(position)
    for pass_ in pipeline:
        constraints.add_edges_from((name, pass_.name) for name in pass_.after if name in position)
        constraints.add_edges_from((pass_.name, name) for name in pass_.before if name in position)
    try:
        names = list(nx.lexicographical_topological_sort(constraints, key=position.__getitem__))
    except nx.NetworkXUnfeasible:
        cycle = [edge[0] for edge in nx.find_cycle(constraints)]
        raise SpikecompileError(f"the after/before constraints of passes {', '.join(cycle)} form a cycle: "
                                f"{' -> '.join(cycle + cycle[:1])}; drop one of them") from None
    return tuple(pipeline[position[name]] for name in names)
