"""Every backend's options, declared as data: what `spikecompile build` offers for each target.

Declared here rather than in the backend packages because a backend package imports torch and its optional
package (nir, onnx) when imported: the CLI builds its options and --help from BY_TARGET without importing any
backend, and each package exposes its own list as OPTIONS. As with a pass's `options`, each option may name a
parser that returns the normalized value or raises a one-line SpikecompileError naming the option.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from spikecompile.errors import SpikecompileError

Parser = Callable[[Any], Any]


@dataclass(frozen=True)
class Option:
    """One option of a backend: `name` is the keyword its check and build take (on the command line --name, with
    "-" for "_"); `type` is int, str, bool (a flag; with default True also --no-name) or a tuple of choices;
    `parse` normalizes a given value or raises SpikecompileError (None: taken as given)."""

    name: str
    type: type | tuple[str, ...]
    default: Any
    help: str
    metavar: str | None = None
    parse: Parser | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def parse_options(declared: list[Option], raw: Mapping[str, Any]) -> dict[str, Any]:
    """The declared options, each normalized by its parser (in declaration order, so the first bad one is named);
    SpikecompileError for an option not declared."""
    by_name = {option.name: option for option in declared}
    unknown = sorted(raw.keys() - by_name.keys())
    if unknown:
        raise SpikecompileError(f"unknown backend option {unknown[0]!r}; valid options: "
                                f"{', '.join(by_name) or 'none'}")
    parsed = {}
    for option in declared:
        value = raw.get(option.name, option.default)
        parsed[option.name] = value if option.parse is None else option.parse(value)
    return parsed


def at_least(flag: str, low: int) -> Parser:
    """A parser that lets None through and refuses a count below `low`."""
    def parse(value: int | None) -> int | None:
        if value is not None and value < low:
            raise SpikecompileError(f"{flag} {value}: must be at least {low}")
        return value
    return parse


def at_least_one(flag: str) -> Parser:
    """A parser that lets None through and refuses a count below 1."""
    return at_least(flag, 1)


def layer_range(layers: str | None) -> list[int] | None:
    """--layers "3" → [3], "2-5" → [2, 3, 4, 5]."""
    if layers is None:
        return None
    first, _, last = layers.partition("-")
    if not first.isdigit() or not (last or first).isdigit() or int(last or first) < int(first):
        raise SpikecompileError(f"--layers {layers}: give a layer (3) or a range of layers (2-5)")
    return list(range(int(first), int(last or first) + 1))


PROGRESS = Option("progress", bool, True, "Progress bars on stderr: the model load, the trace per decoder layer, "
                                         "the target's own stages (export per segment or node).")
"""Every target's: the load and trace bars of `spikecompile build` and the target's own."""

SIM = [
    Option("text", str, "builtin", "Text for the token windows, or 'builtin'."),
    Option("windows", int, 2, "Token windows to simulate.", parse=at_least_one("--windows")),
    Option("seqlen", int, 512, "Tokens per window.", parse=at_least("--seqlen", 2)),
    Option("mode", ("event", "decoded"), "event", "Per-timestep events, or decoded values (same counts, faster)."),
    Option("attention", str, "causal", "Count attention as causal (masked pairs skipped) or full."),
    Option("mask_steps", int, None, "Late-spike masking, keep each neuron's spikes within this many steps of its "
                                    "first.", parse=at_least_one("--mask-steps")),
    Option("float64", bool, False, "Run in float64 (event and decoded then agree to rounding)."),
    Option("numerics", ("float", "loihi2"), "float", "float, or loihi2: the perplexity of the deployed fixed-point "
                                                     "model (hardware/loihi2.py formats; bit-exact with Lava fixed_pt)."),
    Option("allow_saturation", bool, False, "--numerics loihi2: build although an accumulator overflows on the "
                                            "text (then reported); without it, that is an error."),
    Option("energy_target", str, "cmos45nm", "Energy target name or file."),
    PROGRESS,
]
NIR = [
    Option("strict", bool, False, "Fail on an IR node with no NIR lowering and no manifest rule."),
    Option("approximate", bool, False, "Plain IF/Linear nodes for consumers without Threshold/Scale."),
    PROGRESS,
]
LAVA = [
    Option("layers", str, None, "One decoder layer or a range (default: all).", metavar="N|A-B", parse=layer_range),
    Option("block", ("attn", "mlp"), None, "One block of the layer."),
    Option("tokens", int, 4, "Tokens per run of the emitted program.", parse=at_least_one("--tokens")),
    Option("text", str, None, "Also measure the fixed-point model's perplexity and saturations on this text (or "
                              "'builtin'); default: saturations on the model's calibration text."),
    Option("windows", int, 1, "Token windows of the text to run.", parse=at_least_one("--windows")),
    Option("seqlen", int, None, "Tokens per window (default: the model's calibration windows).",
           parse=at_least("--seqlen", 2)),
    Option("allow_saturation", bool, False, "Build although an accumulator overflows on the text (then reported); "
                                            "without it, that is an error."),
    PROGRESS,
]
ONNX = [
    Option("onnx_form", ("decoded", "event", "both"), "both",
           "Decoded (each neuron an elementwise quantizer), event (the T phases explicit) or both."),
    Option("spike_outputs", bool, False, "The event form also outputs every neuron's spike planes."),
    PROGRESS,
]
BY_TARGET: dict[str, list[Option]] = {"ir": [PROGRESS], "sim": SIM, "nir": NIR, "lava": LAVA, "onnx": ONNX}
"""Each target's options, in the order --target lists the targets. Targets may share an option name (--text of sim
and lava): the command line has one such option, and each target takes its own default when it is not given."""
