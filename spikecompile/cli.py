"""Command line: `spikecompile convert`, `eval`, `build`, `inspect`, `report`, `zeroshot`, `tasks`.

Every user error is one line on stderr naming the file, site or option at fault (exit status 2); Ctrl-C and SIGTERM
are one line too (exit status 130 / 143), every output being whole or absent (files.atomic_write/atomic_folder).
Heavy imports (torch, transformers) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import click

from .backends import BY_TARGET, TARGETS, Option
from .devices import DEVICES, DTYPES, part_memory_bytes, peak_memory_mb, resolve_placement, slow_dtype_note
from .errors import Interrupted, SpikecompileError
from .files import atomic_folder, atomic_write, check_not_interrupted, check_output_folder, check_writable, interrupt
from .parallel import launched_rank, launched_ranks, launched_world_size

OUTPUT_PARAMS = ("output", "json_path", "draw_path")
"""The parameters that name what a command writes (a message after an interruption names those left untouched)."""


def _interrupted(interruption: KeyboardInterrupt, untouched: list[str]) -> None:
    """One line, then exit 128 + the signal's number (130 SIGINT, 143 SIGTERM)."""
    number = signal.Signals(getattr(interruption, "signal_number", signal.SIGINT))
    where = f"; nothing was written to {', '.join(untouched)}" if untouched else ""
    click.echo(f"error: interrupted by {number.name}{where}", err=True)
    sys.exit(128 + number)


def _identity(path: str) -> tuple | None:
    """What changes when `path` is written (an atomic write gives it a new inode): None if it does not exist."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns


NOTES = "spikecompile.notes"
"""ctx.meta key: notes a command prints on stderr once it has succeeded"""
PARALLEL_COMMANDS = ("convert",)
"""the commands that run data-parallel under torchrun (spikecompile.parallel)"""


class _Command(click.Command):
    """A command that ends an interruption with one line naming the outputs it left as they were."""

    def invoke(self, ctx):
        if ctx.command.name not in PARALLEL_COMMANDS and launched_world_size() > 1:
            raise SpikecompileError(f"{ctx.command_path}: runs in one process (WORLD_SIZE={launched_world_size()}: "
                                    f"started by torchrun?); only convert runs data-parallel; start it without torchrun")
        outputs = [ctx.params[name] for name in OUTPUT_PARAMS if ctx.params.get(name)]
        before = {path: _identity(path) for path in outputs}

        def untouched() -> list[str]:
            return [path for path in outputs if _identity(path) == before[path]]

        try:
            value = super().invoke(ctx)
            check_not_interrupted()  # a signal whose exception Python swallowed (files.interrupt)
            for note in ctx.meta.get(NOTES, []):
                click.echo(f"note: {note}", err=True)
            return value
        except KeyboardInterrupt as interruption:
            _interrupted(interruption, untouched())
        except Exception:
            # a signal whose exception some code turned into another error: a C extension's module init, when the
            # signal came during an import, reports "ImportError: initialization failed" (scipy's highspy did)
            try:
                check_not_interrupted()
            except Interrupted as interruption:
                _interrupted(interruption, untouched())
            raise


class _Group(click.Group):
    """Every user error, ours or click's (a missing option, a value of the wrong type), as one `error:` line."""

    command_class = _Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpikecompileError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except click.UsageError as error:
            where = error.ctx.command_path if error.ctx else ctx.command_path
            message = " ".join(error.format_message().split()).rstrip(".")
            click.echo(f"error: {where}: {message} (see {where} --help)", err=True)
            sys.exit(2)
        except KeyboardInterrupt as interruption:  # before a command started
            _interrupted(interruption, [])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spikecompile")
def cli():
    """spikecompile: convert LLaMA-family models to phase-coded spiking models and compile them."""


def _placement_options(command):
    """--device and --dtype (devices.resolve_placement checks them before any weight is read)."""
    command = click.option("--dtype", default="float32", show_default=True, type=click.Choice(DTYPES),
                           help="dtype of the source weights and the float forward (neuron fitting stays "
                                "float32).")(command)
    return click.option("--device", default="cpu", show_default=True, type=click.Choice(DEVICES),
                        help="Where the float forward runs: cpu, cuda, or auto (CUDA when present).")(command)


def _placement(device: str, dtype: str):
    """devices.resolve_placement; where the CPU emulates the dtype's matrix products, a note for the end of the
    command (_Command.invoke prints it after a success: an error stays one line)."""
    placement = resolve_placement(device, dtype)
    note = slow_dtype_note(placement)
    if note and launched_rank() == 0:  # under torchrun: once
        click.get_current_context().meta.setdefault(NOTES, []).append(note)
    return placement


def _part_memory_option(command):
    return click.option("--part-memory", default=None, metavar="SIZE",
                        help="Most of one part (a decoder layer, the embedding, lm_head) held on the device, e.g. "
                             "4GiB; the rest of a larger part waits off it (CPU memory for cuda, disk for cpu) and "
                             "accelerate's hooks bring it in for each forward. Default: no limit.")(command)


def _write_json(path: str, payload: dict) -> None:
    def write(temp):
        with open(temp, "w") as stream:
            json.dump(payload, stream, indent=2, default=float)
            stream.write("\n")

    atomic_write(path, write)


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--output", default="model.pt", show_default=True, help="Where to write the spiking model.")
@click.option("-T", "--timesteps", default=8, show_default=True, help="Timesteps per neuron (4..16).")
@click.option("--spike-penalty", default=0.0, show_default=True,
              help="phase, phase-sd: fit MSE/MSE_base2 + F·spikes per activation (0: MSE only).")
@click.option("--energy-budget", type=float, default=None,
              help="Choose each site's T (4..16) so the compute-tier energy is at most F of the ANN's (cmos45nm).")
@click.option("--spikes-per-mac", type=float, default=None,
              help="Choose each site's T (4..16) so the SNN does at most F accumulates per ANN MAC.")
@click.option("-n", "--grains", default=2, show_default=True, help="Grains (base groups) per neuron (1..T/2).")
@click.option("--coding", default="phase", show_default=True,
              help="phase (fitted, multi-granularity), las (base 2), spikedattn (base 2, ≤ 2 spikes), rate (T+1 "
                   "levels), ttfs (one spike), sdllm (ternary counts; -T 4|8|16 for 3|4|5-bit counts) or phase-sd (phase with "
                   "signed digits ±1: a later step can correct an earlier one).")
@click.option("--rotate", default="hadamard", show_default=True, help="hadamard (QuaRot-style) or none.")
@click.option("--prefix", default="auto", show_default=True,
              help="auto: prefixed outlier tokens with a full-precision KV cache (PrefixQuant); none.")
@click.option("--calib", default="builtin", show_default=True, help="Calibration text file, or 'builtin'.")
@click.option("--calib-windows", default=4, show_default=True, help="Calibration windows.")
@click.option("--calib-seqlen", default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--samples-per-site", default=8192, show_default=True, help="Stored activation samples per site.")
@click.option("--weight-bits", type=int, default=None, help="RTN-quantize the decoder weights to 4, 6 or 8 bits.")
@click.option("--membrane-clip", default=0.0, show_default=True,
              help="sdllm: membrane clipping, the share of calibration values sent to a zero count (0: off).")
@click.option("--sdllm-scales", default="static", show_default=True,
              help="sdllm: static (one fitted τ per site) or per-token (each token's min-max scale at run time, as "
                   "SDLLM/QuaRot; builds for sim, NIR and ONNX; Lava and the Loihi 2 mapping refuse it).")
@click.option("--seed", default=0, show_default=True, help="Seed of rotation, sampling and fitting.")
@click.option("--json", "json_path", default=None, help="Also write the conversion report as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion from its checkpoint (OUTPUT.checkpoint, "
                                            "written after each layer); the options must be the same.")
@_placement_options
@_part_memory_option
def convert(model, output, timesteps, spike_penalty, energy_budget, spikes_per_mac, grains, coding, rotate, prefix,
            calib, calib_windows, calib_seqlen, samples_per_site, weight_bits, membrane_clip, sdllm_scales, seed,
            json_path, progress, resume, device, dtype, part_memory):
    """Convert MODEL (HF folder, .gguf file; default: embedded SmolLM2-135M-Instruct) into model.pt."""
    from .budget import LedgerCost
    from .conversion.convert import ConvertOptions, convert as run_convert

    given_t = click.get_current_context().get_parameter_source("timesteps") == click.core.ParameterSource.COMMANDLINE
    for option, value in (("--energy-budget", energy_budget), ("--spikes-per-mac", spikes_per_mac)):
        if value is not None and given_t:
            raise SpikecompileError(f"{option} chooses each site's T; drop -T/--timesteps {timesteps}")

    if json_path:
        check_writable(json_path)
    placement = _placement(device, dtype)
    part_bytes = part_memory_bytes(part_memory)
    options = ConvertOptions(timesteps=timesteps, grains=grains, coding=coding, rotate=rotate, prefix=prefix, calib=calib,
                             calib_windows=calib_windows, calib_seqlen=calib_seqlen,
                             samples_per_site=samples_per_site, weight_bits=weight_bits,
                             membrane_clip=membrane_clip, seed=seed, spike_penalty=spike_penalty,
                             energy_budget=energy_budget, spikes_per_mac=spikes_per_mac, sdllm_scales=sdllm_scales)
    ranks = launched_ranks(placement.device)
    report = run_convert(model, output, options, progress=progress, placement=placement, resume=resume,
                         cost_model=LedgerCost, part_memory=part_bytes, ranks=ranks)
    if report is None:  # a data-parallel rank other than 0: rank 0 reports
        return
    stages = ", ".join(f"{stage}{' (cached)' if stage == 'prefix' and report.prefix_cached else ''} {seconds:.1f} s"
                       for stage, seconds in report.timings_s.items())
    steps = "per site (budget)" if options.budget else timesteps
    click.echo(f"wrote {report.output}: {report.sites} spike sites, T={steps}, coding={coding}, "
               f"rotate={rotate} ({stages}; peak RSS {report.peak_rss_mb:.0f} MB)")
    if json_path:
        _write_json(json_path, asdict(report))


def site_error_rows(record: dict) -> list[dict]:
    """Per site: fitted MSE, base-2 MSE at the same τ rule, the Lloyd-Max bound, and their ratios."""
    rows = []
    for name, entry in record["sites"].items():
        calib = entry["calibration"]
        bound = max(calib["lloyd_max_mse"], 1e-30)
        rows.append({
            "site": name, "kind": entry["kind"], "tau": float(entry["tau"]), "genotype": entry["genotype"].tolist(),
            "fitted_mse": calib["mse"], "base2_mse": calib["base2_mse"], "lloyd_max_mse": calib["lloyd_max_mse"],
            "fitted_over_bound": calib["mse"] / bound, "base2_over_bound": calib["base2_mse"] / bound,
        })
    return rows


def _print_site_table(rows: list[dict]) -> None:
    click.echo(f"{'site':<24}{'tau':>10} {'fitted MSE':>11} {'base-2 MSE':>11} {'Lloyd-Max':>11}"
               f" {'fit/LM':>8} {'b2/LM':>8}")
    for row in rows:  # a space before every column: wide numbers never run into each other
        click.echo(f"{row['site']:<24}{row['tau']:>10.4g} {row['fitted_mse']:>11.4g} {row['base2_mse']:>11.4g}"
                   f" {row['lloyd_max_mse']:>11.4g} {row['fitted_over_bound']:>8.4g} {row['base2_over_bound']:>8.4g}")
    kinds = dict.fromkeys(row["kind"] for row in rows)
    click.echo("median by site kind:")
    for kind in kinds:
        of_kind = [row for row in rows if row["kind"] == kind]
        fitted = statistics.median(row["fitted_over_bound"] for row in of_kind)
        base2 = statistics.median(row["base2_over_bound"] for row in of_kind)
        click.echo(f"  {kind:<14} fitted/Lloyd-Max {fitted:6.2f}   base-2/Lloyd-Max {base2:6.2f}")


@cli.command(name="eval")
@click.argument("model_file")
@click.option("--ppl", "ppl_text", default="builtin", show_default=True,
              help="Text file for perplexity (e.g. wikitext-2-raw.wiki.test.raw), or 'builtin'.")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per window.")
@click.option("--max-windows", default=None, type=int, help="Use only the first N windows.")
@click.option("--source", default=None, help="Path of the source model if it moved since conversion.")
@click.option("--json", "json_path", default=None, help="Also write everything as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
@_placement_options
@_part_memory_option
def evaluate(model_file, ppl_text, seqlen, max_windows, source, json_path, progress, device, dtype, part_memory):
    """Print ANN and SNN perplexity and the per-site conversion error of MODEL_FILE (a model.pt), computed one
    decoder layer at a time (memory: one layer and the windows' hidden states)."""
    from . import modelfile
    from .conversion.streamed_eval import streamed_perplexities
    from .data import load_text
    from .files import file_sha256

    if json_path:
        check_writable(json_path)
    placement = _placement(device, dtype)
    part_bytes = part_memory_bytes(part_memory)
    _check_model_file(model_file, "eval")
    if seqlen < 2:
        raise SpikecompileError(f"--seqlen {seqlen}: must be at least 2")
    if max_windows is not None and max_windows < 1:
        raise SpikecompileError(f"--max-windows {max_windows}: must be at least 1")
    text = load_text(ppl_text, split="eval")
    record = modelfile.load(model_file)
    figures = streamed_perplexities(model_file, record, text, seqlen, max_windows, source, placement, progress,
                                    part_bytes)
    rows = site_error_rows(record)
    _print_site_table(rows)
    ann, prefixed, snn = figures.ann, figures.prefixed_float, figures.snn  # no prefix: prefixed is the ANN
    coding = record["coding"]
    steps = _steps_text(coding, record.get("budget"))
    click.echo(f"perplexity on {text.name} ({figures.windows} windows x {seqlen} tokens), "
               f"coding={coding['name']} T={steps} grains={coding['grains']}:")
    click.echo(f"  ANN {ann:.4f}   SNN {snn:.4f}   ratio SNN/ANN {snn / ann:.4f}")
    click.echo(f"  float model with the same prefix {prefixed:.4f}   ratio SNN/(float + prefix) {snn / prefixed:.4f}")
    if json_path:
        _write_json(json_path, {
            "model_file": model_file, "model_sha256": file_sha256(model_file), "source": record["source"],
            "prefix_token_ids": record["prefix"]["token_ids"] if record["prefix"] else [], "text": text.name,
            "seqlen": seqlen, "windows": figures.windows,
            "coding": coding, "ann_ppl": ann, "prefixed_float_ppl": prefixed, "snn_ppl": snn,
            "ppl_ratio": snn / ann, "ppl_ratio_prefixed": snn / prefixed, "sites": rows,
            "placement": asdict(placement), "timings_s": figures.timings_s,
            "layer_s": figures.layer_s, **peak_memory_mb(),
        })


def _steps_text(coding: dict, budget: dict | None) -> str:
    """T as eval and zeroshot print it: the one T, or, for a budget model, per site and at most the coding's T."""
    return f"per site (budget, at most {coding['timesteps']})" if budget else str(coding["timesteps"])


class _TargetSections(_Command):
    """A command whose --help lists its own options, then each target's options under a heading of their own."""

    def format_options(self, ctx, formatter):
        owners: dict[str, list[str]] = {}
        for target, options in BY_TARGET.items():
            for option in options:
                owners.setdefault(option.name, []).append(target)
        owner = {name: ", ".join(targets) for name, targets in owners.items()}
        sections: dict[str, list] = {"Options": []}
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument):  # click lists arguments in the usage line, not here
                continue
            record = param.get_help_record(ctx)
            if record:
                heading = f"{owner[param.name]} options" if param.name in owner else "Options"
                sections.setdefault(heading, []).append(record)
        for heading, records in sections.items():
            with formatter.section(heading):
                formatter.write_dl(records)


def _target_options(command):
    """Decorator: one click option per backend option (backends.options.BY_TARGET), in declaration order."""
    first = {}
    for option in (option for options in BY_TARGET.values() for option in options):
        first.setdefault(option.name, option)  # a name shared by targets is one option (its first declaration)
    for option in reversed(list(first.values())):
        command = click.option(*_declarations(option), **_attributes(option))(command)
    return command


def _declarations(option: Option) -> list[str]:
    """--name (a flag with default True: --name/--no-name), then the keyword it fills."""
    if option.type is bool and option.default:
        return [f"{option.flag}/--no-{option.flag[2:]}", option.name]
    return [option.flag, option.name]


def _attributes(option: Option) -> dict:
    """click's settings for the option: a flag, a choice or a typed value, its default shown where it has one."""
    attributes = {"default": option.default, "help": option.help, "show_default": option.default not in (None, False)}
    if option.type is bool:
        return {**attributes, "is_flag": True}
    kind = click.Choice(option.type) if isinstance(option.type, tuple) else option.type
    return {**attributes, "type": kind, "metavar": option.metavar}


@cli.command(cls=_TargetSections)
@click.argument("model_file")
@click.option("--target", default="ir", show_default=True, type=click.Choice(TARGETS),
              help="ir: the compiled graph folder (graph.json, tensors, weights); sim: run the reference simulator "
                   "on token windows and write sim.json with the energy report; nir: standard NIR segments, a "
                   "manifest for the ops NIR cannot express, and a fidelity report; lava: a self-contained Lava "
                   "program (numpy + lava-nc only) for the model, --layers or one --block; onnx: decoded and/or "
                   "event ONNX models checked in onnxruntime.")
@click.option("-o", "--output", required=True, help="Output folder.")
@click.option("-T", "--timesteps", default=None, type=int, help="One T for every site (default: each site's fitted T).")
@click.option("--site-timesteps", "site_timesteps", multiple=True, metavar="SITE=T",
              help="T of one site, e.g. layers.3.silu=10 (repeatable; wins over --overrides).")
@click.option("--overrides", "overrides_file", default=None, help="TOML file whose [sites] table maps sites to T.")
@click.option("--grain-search", default=None, type=click.Choice(["darts", "even"]),
              help="Re-allocate each site's grains: darts (Algorithm 2) or even split, then refit.")
@click.option("--disable-pass", "disabled", multiple=True, metavar="NAME", help="Skip a pass (repeatable).")
@click.option("--source", default=None, help="Path of the source model if it moved since conversion.")
@_target_options
def build(model_file, target, output, timesteps, site_timesteps, overrides_file, grain_search, disabled, source,
          **target_options):
    """Compile MODEL_FILE (a model.pt): trace it into the IR, run the passes, write the target to OUTPUT."""
    from .backends import load
    from .build import BuildOptions, build as run_build, pass_manager
    from .passes.timesteps import check_timesteps, parse_site_overrides

    _check_model_file(model_file, "build")
    if timesteps is not None:
        check_timesteps(timesteps, "--timesteps")
    sites = {**(parse_site_overrides(overrides_file) if overrides_file else {}),
             **parse_site_overrides(list(site_timesteps))}
    options = BuildOptions(timesteps=timesteps, site_timesteps=sites, grain_search=grain_search,
                           disabled=tuple(disabled), source=source)
    pass_manager(options)  # every pass name and option checked before the model is loaded
    check_output_folder(output)
    _check_target_options(click.get_current_context(), target)
    backend = load(target)  # one-line error here if its optional package is missing, before the model loads
    prepared = backend.check({option.name: _given(option, target_options) for option in backend.OPTIONS})
    # the checks that need model.pt's site table (site names, a fitted site's T, --layers) run before the source
    # model loads
    check_record = getattr(backend, "check_record", None)
    result = run_build(model_file, options, check_record and (lambda record: check_record(record, prepared)),
                       progress=prepared["progress"])
    with atomic_folder(output) as folder:  # the backend writes a temporary sibling, renamed when it is whole
        report = backend.build(result, folder, **prepared)
    for line in backend.report_lines(report, output):
        click.echo(line)


def _given(option: Option, values: dict):
    """The option's value from the command line, or the target's own default (targets sharing a name may differ)."""
    from click.core import ParameterSource

    given = click.get_current_context().get_parameter_source(option.name) is ParameterSource.COMMANDLINE
    return values[option.name] if given else option.default


def _check_target_options(ctx, target: str) -> None:
    """An option of another target given on the command line fails rather than being ignored."""
    from click.core import ParameterSource

    own = {option.name for option in BY_TARGET[target]}
    for other, options in BY_TARGET.items():
        for option in options:
            if other != target and option.name not in own and \
                    ctx.get_parameter_source(option.name) is ParameterSource.COMMANDLINE:
                raise SpikecompileError(f"{option.flag}: an option of --target {other}, not of --target {target}")


BUILT_FOLDER_FILES = ("graph.json", "build.json", "sim.json", "manifest.json", "network.json", "onnx.json")
"""A file each `build` target writes: a folder holding one was written by `spikecompile build`."""


def _check_model_file(path: str, command: str) -> None:
    """MODEL_FILE must be a model.pt: a folder fails here with what the folder is and what to do with it
    (a missing or unreadable file fails in modelfile.load, before the source model loads)."""
    from pathlib import Path

    folder = Path(path)
    if not folder.is_dir():
        return
    takes = f"{command} takes a model.pt (written by spikecompile convert)"
    if any((folder / name).is_file() for name in BUILT_FOLDER_FILES):
        raise SpikecompileError(f"{path}: a folder written by spikecompile build; {takes}. Summarise an IR folder "
                                f"with: spikecompile inspect {path}; for another target (sim, nir, lava, onnx), "
                                f"build from the model.pt it was built from{_built_from(folder)}")
    if (folder / "config.json").is_file():
        raise SpikecompileError(f"{path}: a Hugging Face model folder; {takes}. Convert it first: "
                                f"spikecompile convert {path} -o model.pt")
    raise SpikecompileError(f"{path}: is a folder; {takes}")


def _built_from(folder) -> str:
    """" (PATH)": the model.pt that build.json or sim.json of a built folder names, or "" if none says."""
    for name in ("build.json", "sim.json"):
        try:
            document = json.loads((folder / name).read_text(encoding="utf-8"))
            return f" ({document['model']['path']})"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return ""


@cli.command()
@click.argument("path")
@click.option("--seq-len", default=512, show_default=True, help="Sequence length for per-token counts.")
@click.option("--draw", "draw_path", default=None, help="Also draw one decoder layer to this .svg or .png file.")
@click.option("--layer", default=0, show_default=True, help="The decoder layer --draw renders.")
@click.option("--source", default=None, help="Path of the source model if it moved since conversion (model.pt).")
@click.option("--json", "json_path", default=None, help="Also write the summary as JSON.")
@click.option("--formats", "formats", default=None, type=click.Choice(["loihi2"]),
              help="Also state the deployed formats on this target: per synapse, site and op, the accumulator "
                   "headroom, and (a model.pt) the saturations on its calibration samples.")
def inspect(path, seq_len, draw_path, layer, source, json_path, formats):
    """Summarise PATH, a model.pt (traced on the fly) or a folder written by `build`: layers, sites with their T
    and genotype, node and synapse counts, parameter memory."""
    from pathlib import Path

    from .summary import DRAWING_SUFFIXES, draw_layer, format_summary, layer_drawing_graph, summarize

    if seq_len < 1:
        raise SpikecompileError(f"--seq-len {seq_len}: must be at least 1")
    for target in (draw_path, json_path):
        if target:
            check_writable(target)
    if draw_path and Path(draw_path).suffix.lower() not in DRAWING_SUFFIXES:
        raise SpikecompileError(f"--draw {draw_path}: cannot draw to a {Path(draw_path).suffix or 'suffix-less'} "
                                f"file; use one of {', '.join(DRAWING_SUFFIXES)}")
    graph = _graph_of(Path(path), source)
    if draw_path:
        layer_drawing_graph(graph, layer)  # a layer the graph lacks fails before anything is printed
    summary = summarize(graph, seq_len=seq_len)
    if formats:
        summary["loihi2"] = _deployment(Path(path), graph, source)
    click.echo(format_summary(summary))
    if draw_path:
        draw_layer(graph, layer, draw_path)
        click.echo(f"drew layer {layer} to {draw_path}")
    if json_path:
        _write_json(json_path, summary)


def _deployment(path, graph, source) -> dict:
    """inspect --formats loihi2: the deployment report of a built IR folder (its weights), or of a model.pt as
    `build` compiles it (with its calibration samples)."""
    from .build import BuildOptions, build as run_build
    from .ir.serialize import read_weights
    from .summary import deployment_summary

    if path.is_dir():
        return deployment_summary(graph, read_weights(path, graph))
    result = run_build(str(path), BuildOptions(source=source))
    samples = {site: entry["samples"] for site, entry in result.record["sites"].items() if "samples" in entry}
    return deployment_summary(result.graph, result.store, samples)


def _graph_of(path, source):
    from .ir import read

    if path.is_dir():
        if not (path / "graph.json").is_file():
            kind = "a Hugging Face model folder (convert it first)" if (path / "config.json").is_file() else \
                "a folder without graph.json"
            raise SpikecompileError(f"{path}: {kind}; inspect takes a model.pt or a folder written by "
                                    f"spikecompile build --target ir")
        return read(path)
    if not path.is_file():
        raise SpikecompileError(f"{path}: no such model.pt file or IR folder")
    from .conversion.convert import load_spiking_model
    from .frontend import trace

    return trace(load_spiking_model(str(path), source_path=source))[0]


@cli.command()
@click.argument("run_file", required=False)
@click.option("-o", "--output", required=True, help="Folder for report.json, report.md and the plots.")
@click.option("--energy-target", default="cmos45nm", show_default=True, help="Energy target name or file.")
@click.option("--site", default=None, help="Also plot this site's activation histogram with its neuron's levels.")
@click.option("--model", "model_file", default=None, help="The model.pt RUN_FILE was measured on (for --site).")
@click.option("--config", "config_file", default=None,
              help="Analytic mode: a model config.json (e.g. targets/models/llama-3-8b.json) instead of RUN_FILE.")
@click.option("--rates", "rates_file", default=None,
              help="Analytic mode: take each site kind's rate from this sim.json.")
@click.option("--rate", "rate_items", multiple=True, metavar="KIND=RATE", help="Analytic mode: one site kind's rate.")
@click.option("--seq-len", default=512, show_default=True, help="Analytic mode: tokens per sequence.")
@click.option("-T", "--timesteps", default=6, show_default=True, help="Analytic mode: timesteps per neuron.")
@click.option("--grains", default=2, show_default=True, help="Analytic mode: grains per neuron.")
@click.option("--attention", default="causal", show_default=True, help="Analytic mode: causal or full.")
def report(run_file, output, energy_target, site, model_file, config_file, rates_file, rate_items, seq_len,
           timesteps, grains, attention):
    """Energy and firing-rate report of RUN_FILE (a sim.json from `build --target sim`), or analytic (--config with
    --rates/--rate): JSON, Markdown and plots in OUTPUT."""
    from .backends.sim.ledger import ledger
    from .backends.sim.report import write_report
    from .hardware.energy import load_target

    _check_report_mode(click.get_current_context(), run_file, config_file)
    check_output_folder(output)
    if site and not model_file:
        raise SpikecompileError(f"--site {site}: give --model, the model.pt holding its calibration samples")
    target = load_target(energy_target)
    meta = None
    if config_file:
        run = _analytic_run(config_file, rates_file, rate_items, seq_len, timesteps, grains, attention)
    else:
        run, meta = _measured_run(run_file)
        attention = meta["attention"]
    samples = neuron = None
    if site:
        samples, neuron = _site_data(site, model_file, meta)
    with atomic_folder(output) as folder:
        write_report(run, ledger(run, target, attention), folder, site, samples, neuron)
    click.echo(f"wrote the report to {output}")


ANALYTIC_ONLY = {"rates_file": "--rates", "rate_items": "--rate", "seq_len": "--seq-len", "timesteps": "-T",
                 "grains": "--grains", "attention": "--attention"}
"""report's options that only the analytic mode (--config) reads, by parameter name."""


def _check_report_mode(ctx, run_file: str | None, config_file: str | None) -> None:
    """One mode: a RUN_FILE (measured), or --config (analytic); an analytic option given with a RUN_FILE fails
    rather than being ignored."""
    from click.core import ParameterSource

    if run_file and config_file:
        raise SpikecompileError(f"report: give a sim.json ({run_file}) or --config {config_file}, not both")
    if not run_file and not config_file:
        raise SpikecompileError("report: give a sim.json (from spikecompile build --target sim) or --config")
    if run_file:
        given = [flag for name, flag in ANALYTIC_ONLY.items()
                 if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
        if given:
            raise SpikecompileError(f"{given[0]}: an analytic-mode option (with --config); a sim.json brings its "
                                    f"own rates, sequence length, T and attention counting")


def _measured_run(run_file: str):
    from .backends.sim.measure import load_run

    if run_file.endswith(".pt"):
        raise SpikecompileError(f"{run_file}: a model.pt holds no simulation run; make one with "
                                f"spikecompile build {run_file} --target sim -o DIR, then report DIR/sim.json")
    return load_run(run_file)


def _analytic_run(config_file, rates_file, rate_items, seq_len, timesteps, grains, attention):
    from .analytic import config_graph, load_config
    from .backends.sim.analytic import analytic_run
    from .backends.sim.counting import check_attention
    from .backends.sim.results import rates_by_kind
    from .ir.neurons import SITE_KINDS
    from .passes.timesteps import check_timesteps

    check_attention(attention)
    check_timesteps(timesteps, "-T")
    if not 1 <= grains <= timesteps // 2:
        raise SpikecompileError(f"--grains {grains}: must be in 1..T/2 = 1..{timesteps // 2} (each grain spans ≥ 2 "
                                f"steps)")
    if seq_len < 1:
        raise SpikecompileError(f"--seq-len {seq_len}: must be at least 1")
    given = _rate_options(rate_items)
    rates = rates_by_kind(_measured_run(rates_file)[0]) if rates_file else {}
    rates.update(given)
    if not rates:
        raise SpikecompileError("report --config: give the firing rates (--rates sim.json or --rate KIND=RATE)")
    missing = [kind for kind in SITE_KINDS if kind not in rates]
    if missing:
        raise SpikecompileError(f"--rate: no rate for site kind {missing[0]} (given: {', '.join(sorted(rates))}); "
                                f"give every kind: {', '.join(SITE_KINDS)}")
    graph = config_graph(load_config(config_file), timesteps, grains)
    return analytic_run(graph, seq_len, rates, attention)


def _rate_options(items) -> dict[str, float]:
    """--rate KIND=RATE items as {kind: rate}; a one-line error for an unknown kind or a rate outside [0, 1]."""
    import math

    from .ir.neurons import SITE_KINDS

    rates = {}
    for item in items:
        kind, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            raise SpikecompileError(f"--rate {item}: give KIND=RATE, e.g. silu=0.12") from None
        if kind not in SITE_KINDS:
            raise SpikecompileError(f"--rate {item}: unknown site kind {kind!r}; kinds: {', '.join(SITE_KINDS)}")
        if not (math.isfinite(rate) and 0 <= rate <= 1):
            raise SpikecompileError(f"--rate {item}: a firing rate is a share of elements × steps, in [0, 1]")
        rates[kind] = rate
    return rates


def _site_data(site: str, model_file: str | None, meta: dict | None):
    """The site's calibration samples and neuron from the model.pt the run was measured on."""
    from .conversion.convert import site_neuron
    from .files import file_sha256
    from .modelfile import load

    if not model_file:
        raise SpikecompileError(f"--site {site}: give --model, the model.pt holding its calibration samples")
    if meta and meta["model"]["sha256"] != file_sha256(model_file):
        raise SpikecompileError(f"--model {model_file}: the run was measured on another model "
                                f"({meta['model']['path']}); give that one")
    record = load(model_file)
    entry = record["sites"].get(site)
    if entry is None or "samples" not in entry:
        raise SpikecompileError(f"--site {site}: {model_file} has no such site with calibration samples")
    return entry["samples"], site_neuron(entry)


@cli.command()
@click.option("--point", "points", nargs=3, multiple=True, required=True, metavar="LABEL SIM_JSON EVAL_JSON",
              help="One model: a label, its sim.json (build --target sim --mode decoded over the evaluation windows) "
                   "and its eval --json on the same windows. Repeat for every point.")
@click.option("-o", "--output", required=True, help="Folder for frontier.json, frontier.md and frontier.png.")
@click.option("--energy-target", default="cmos45nm", show_default=True, help="Energy target name or file.")
@click.option("--published/--no-published", default=True, show_default=True,
              help="Also draw the papers' published points (other models, labelled so).")
def frontier(points, output, energy_target, published):
    """The accuracy-energy frontier: perplexity ratio against ACs per ANN MAC and SNN/ANN energy at each tier,
    one point per model, each cost's Pareto set marked."""
    from .backends.sim.frontier import measured_point, write_frontier
    from .hardware.energy import load_target

    check_output_folder(output)
    target = load_target(energy_target)
    measured = [measured_point(label, sim_file, eval_file, target) for label, sim_file, eval_file in points]
    with atomic_folder(output) as folder:
        write_frontier(measured, folder, published)
    click.echo(f"wrote the frontier of {len(measured)} points to {output}")


def _zeroshot_module():
    """spikecompile.zeroshot, or a one-line error if lm-eval (the `eval` extra) is missing."""
    import importlib.util
    import os

    if importlib.util.find_spec("lm_eval") is None:
        raise SpikecompileError("lm-eval is not installed: pip install -e '.[eval]' (scripts/install.sh does it)")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(name, "1")  # tasks are local JSON files: never ask the hub
    from . import zeroshot

    return zeroshot


@cli.command()
@click.argument("model_file")
@click.option("--task", "task_specs", multiple=True, required=True, metavar="NAME=FILE.jsonl",
              help="A JSON Lines file of {query, choices, gold} records, e.g. copa=../shared/data/copa_val.jsonl "
                   "(repeatable).")
@click.option("--mode", default="spiking", show_default=True, type=click.Choice(["spiking", "ann", "both"]),
              help="spiking: the spiking model after its KV prefix; ann: the float model (sites off, no prefix), "
                   "scored the same way; both.")
@click.option("--limit", default=None, type=int, help="Only the first N records of each task.")
@click.option("--batch-size", default=16, show_default=True, help="Requests per forward.")
@click.option("--source", default=None, help="Path of the source model if it moved since conversion.")
@click.option("--json", "json_path", default=None, help="Also write the results as JSON.")
@_placement_options
def zeroshot(model_file, task_specs, mode, limit, batch_size, source, json_path, device, dtype):
    """Zero-shot multiple-choice accuracy of MODEL_FILE (a model.pt) through lm-eval: acc and acc_norm (± stderr)
    as lm-eval computes them, per task."""
    from .files import file_sha256

    placement = _placement(device, dtype)
    _check_model_file(model_file, "zeroshot")
    if json_path:
        check_writable(json_path)
    if limit is not None and limit < 1:
        raise SpikecompileError(f"--limit {limit}: must be at least 1")
    if batch_size < 1:
        raise SpikecompileError(f"--batch-size {batch_size}: must be at least 1")
    module = _zeroshot_module()
    tasks = module.parse_task_specs(task_specs)
    modes = ("spiking", "ann") if mode == "both" else (mode,)
    outcome = module.zeroshot_eval(model_file, tasks, modes, limit, batch_size, source, device, dtype)
    coding = outcome["coding"]
    click.echo(f"zero-shot accuracy of {model_file} (coding={coding['name']} "
               f"T={_steps_text(coding, outcome['budget'])}; "
               f"lm-eval {outcome['lm_eval']}, 0-shot):")
    click.echo(f"  {'task':<16}{'mode':<9}{'n':>6}  {'acc':<15}  {'acc_norm'}")
    for mode_name, rows in outcome["results"].items():
        for name, row in rows.items():
            click.echo(f"  {name:<16}{mode_name:<9}{row['n']:>6}  {row['acc']:.4f} ± {row['acc_stderr']:.4f}  "
                       f"{row['acc_norm']:.4f} ± {row['acc_norm_stderr']:.4f}")
    if json_path:
        files = {name: {"file": str(path), "sha256": file_sha256(path)} for name, path in tasks.items()}
        _write_json(json_path, {"model_file": model_file, "limit": limit, "tasks": files, **outcome,
                                "placement": asdict(placement), **peak_memory_mb()})


@cli.command(name="tasks")
@click.argument("files", nargs=-1, required=True, metavar="[NAME=]FILE.jsonl...")
@click.option("-o", "--output", required=True, help="Folder for the task YAML files.")
def write_tasks(files, output):
    """Write an lm-eval task YAML (multiple choice, acc and acc_norm) for each JSON Lines file of {query, choices,
    gold} records (the name is the file's stem unless given as NAME=FILE), for lm_eval --tasks."""
    check_output_folder(output)
    module = _zeroshot_module()
    tasks = module.parse_task_specs(files, label="tasks")
    with atomic_folder(output) as folder:
        names = [module.write_task_yaml(name, path, folder).name for name, path in tasks.items()]
    written = [Path(output) / name for name in names]
    for path in written:
        click.echo(f"wrote {path}")
    click.echo("run: lm_eval --model spikecompile --model_args path=model.pt --batch_size auto --tasks "
               + ",".join(str(path) for path in written))


def _unraisable(unraisable) -> None:
    """Python's report of an exception it cannot propagate, except an interruption raised inside a __del__ or a
    weakref callback (h5py's): that one is not printed, and files.interrupt still refuses every later commit."""
    if not isinstance(unraisable.exc_value, Interrupted):
        sys.__unraisablehook__(unraisable)


def main():
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, interrupt)  # both raise Interrupted, a KeyboardInterrupt: every clean-up runs
    sys.unraisablehook = _unraisable
    cli(prog_name="spikecompile")
