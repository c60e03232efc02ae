"""The bad-input suite: every command given bad options, files and paths, each case through the real CLI.

Each case asserts the exit status (2), that stderr holds exactly one line and it starts with `error: ` (no
traceback, no click usage block), that the line names the fault (the case's `names`), and that every path the
case touches (the -o target and the input files) is byte for byte as it was, an absent one still absent. Most
cases fail before any model is loaded (README: option checks come first).

The table is CASES (add a row for a new bad input); bench/bad_inputs.py runs the same table and writes
bench/results/bad_inputs.md and .json. Paths in a case's arguments are placeholders filled from the workspace
(make_workspace): {model} a converted tiny model.pt, {nan} the same with NaN calibration samples at layers.0.q,
{hf} its source Hugging Face folder, {ir} a folder written by `build --target ir`, {sim} a sim.json, {text} a
text file, {file} a text file that is not what the option wants, {binary} random bytes, {task} a valid task
file, {bad_task} a task file with `gold` out of range, {toml_*} overrides files, {missing} a path that does not
exist, {out} the case's own output path (absent before and after).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import convert_tiny

ROOT = Path(__file__).resolve().parents[1]
RATES = [f"--rate={kind}=0.1" for kind in
         ("attn_norm", "q", "k", "v", "attn_probs", "o_proj_in", "mlp_norm", "silu", "down_proj_in", "final_norm")]
"""A firing rate for every site kind (analytic report mode)."""


@dataclass(frozen=True)
class Case:
    """One bad input: `args` after `spikecompile` (placeholders as in the module docstring), the text its error
    line must contain, the paths that must stay unchanged ({out} always), and a module the command needs (the case
    is skipped without it)."""

    id: str
    args: tuple[str, ...]
    names: str
    watch: tuple[str, ...] = ()
    needs: str | None = None
    exit_code: int = 2


def case(id, *args, names, watch=(), needs=None):
    return Case(id, tuple(args), names, tuple(watch), needs)


CONVERT = ("convert", "{hf}", "-o", "{out}")
BUILD = ("build", "{model}", "-o", "{out}")
SIM = (*BUILD, "--target", "sim")
LAVA = (*BUILD, "--target", "lava")
REPORT = ("report", "{sim}", "-o", "{out}")
ANALYTIC = ("report", "--config", "smollm2-135m", "-o", "{out}")
ZEROSHOT = ("zeroshot", "{model}", "--task", "copa={task}")
MODEL_IN = ("{model}", "{hf}")

CASES = [
    # convert: every option checked before the source model loads
    case("convert T below range", *CONVERT, "-T", "3", names="--timesteps 3", watch=MODEL_IN),
    case("convert T above range", *CONVERT, "-T", "17", names="--timesteps 17"),
    case("convert grains 0", *CONVERT, "--grains", "0", names="--grains 0"),
    case("convert grains > T/2", *CONVERT, "-T", "8", "--grains", "5", names="--grains 5"),
    case("convert unknown coding", *CONVERT, "--coding", "pulse", names="--coding 'pulse'"),
    case("convert sdllm at T=6", *CONVERT, "--coding", "sdllm", "-T", "6", names="--coding sdllm -T 6"),
    case("convert weight bits 5", *CONVERT, "--weight-bits", "5", names="--weight-bits 5"),
    case("convert weight bits not a number", *CONVERT, "--weight-bits", "eight", names="'--weight-bits'"),
    case("convert membrane clip without sdllm", *CONVERT, "--membrane-clip", "0.5", names="--membrane-clip"),
    case("convert membrane clip 1.5", *CONVERT, "--coding", "sdllm", "--membrane-clip", "1.5",
         names="--membrane-clip 1.5"),
    case("convert membrane clip negative", *CONVERT, "--coding", "sdllm", "--membrane-clip", "-0.5",
         names="--membrane-clip -0.5"),
    case("convert unknown rotation", *CONVERT, "--rotate", "givens", names="--rotate 'givens'"),
    case("convert unknown prefix", *CONVERT, "--prefix", "bos", names="--prefix 'bos'"),
    case("convert calib windows 0", *CONVERT, "--calib-windows", "0", names="--calib-windows 0"),
    case("convert calib seqlen 0", *CONVERT, "--calib-seqlen", "0", names="--calib-seqlen 0"),
    case("convert calib seqlen 1", *CONVERT, "--calib-seqlen", "1", names="--calib-seqlen 1"),
    case("convert samples per site 0", *CONVERT, "--samples-per-site", "0", names="--samples-per-site 0"),
    case("convert negative seed", *CONVERT, "--seed", "-1", names="--seed -1"),
    case("convert seed past 64 bits", *CONVERT, "--seed", str(10**25), names=f"--seed {10**25}"),
    case("convert calib text missing", *CONVERT, "--calib", "{missing}.txt", names="{missing}.txt"),
    case("convert calib text binary", *CONVERT, "--calib", "{binary}", names="{binary}", watch=("{binary}",)),
    case("convert model missing", "convert", "{missing}", "-o", "{out}", names="{missing}: no such model"),
    case("convert model is a text file", "convert", "{file}", "-o", "{out}", names="{file}", watch=("{file}",)),
    case("convert output dir missing", "convert", "{hf}", "-o", "{missing}/model.pt", names="{missing}",
         watch=("{missing}",)),
    case("convert output is a folder", "convert", "{hf}", "-o", "{ir}", names="{ir}: is a directory",
         watch=("{ir}",)),
    case("convert json dir missing", *CONVERT, "--json", "{missing}/r.json", names="{missing}/r.json",
         watch=("{missing}",)),
    # eval
    case("eval seqlen 1", "eval", "{model}", "--seqlen", "1", names="--seqlen 1", watch=("{model}",)),
    case("eval max windows 0", "eval", "{model}", "--max-windows", "0", names="--max-windows 0"),
    case("eval text missing", "eval", "{model}", "--ppl", "{missing}.txt", names="{missing}.txt"),
    case("eval model missing", "eval", "{missing}.pt", names="{missing}.pt: no such model file"),
    case("eval HF folder", "eval", "{hf}", names="a Hugging Face model folder; eval takes a model.pt",
         watch=("{hf}",)),
    case("eval built folder", "eval", "{ir}", names="written by spikecompile build; eval takes a model.pt",
         watch=("{ir}",)),
    case("eval text file as model", "eval", "{file}", names="{file}: not a readable model.pt", watch=("{file}",)),
    case("eval random bytes as model", "eval", "{binary}", names="{binary}", watch=("{binary}",)),
    case("eval json is a folder", "eval", "{model}", "--json", "{ir}", names="{ir}: is a directory",
         watch=("{ir}",)),
    # build: options, then model.pt's site table, before the source model loads
    case("build IR folder", "build", "{ir}", "-o", "{out}", names="spikecompile inspect {ir}", watch=("{ir}",)),
    case("build HF folder", "build", "{hf}", "-o", "{out}", names="spikecompile convert {hf}", watch=("{hf}",)),
    case("build model missing", "build", "{missing}.pt", "-o", "{out}", names="{missing}.pt"),
    case("build without -o", "build", "{model}", names="'-o' / '--output'"),
    case("build T out of range", *BUILD, "-T", "20", names="--timesteps: T=20"),
    case("build T a fitted site cannot run", *BUILD, "-T", "8", names="-T 8: site layers.0.attn_norm",
         watch=MODEL_IN),
    case("build site T out of range", *BUILD, "--site-timesteps", "layers.0.silu=40", names="site layers.0.silu"),
    case("build site override without T", *BUILD, "--site-timesteps", "layers.0.silu",
         names="'layers.0.silu' is not of the form SITE=T"),
    case("build site override unknown site", *BUILD, "--site-timesteps", "layers.9.silu=6",
         names="site layers.9.silu: no such spike site"),
    case("build site T a fitted site cannot run", *BUILD, "--site-timesteps", "layers.0.silu=8",
         names="timestep override layers.0.silu=8"),
    case("build overrides missing", *BUILD, "--overrides", "{missing}.toml", names="{missing}.toml"),
    case("build overrides not TOML", *BUILD, "--overrides", "{file}", names="{file}: not valid TOML"),
    case("build overrides binary", *BUILD, "--overrides", "{binary}", names="{binary}"),
    case("build overrides without [sites]", *BUILD, "--overrides", "{toml_no_sites}", names="[sites]",
         watch=("{toml_no_sites}",)),
    case("build overrides unknown site", *BUILD, "--overrides", "{toml_unknown_site}", names="layers.7.q",
         watch=("{toml_unknown_site}",)),
    case("build unknown pass disabled", *BUILD, "--disable-pass", "fold", names="unknown pass 'fold'"),
    case("build unknown target", *BUILD, "--target", "tpu", names="'--target'"),
    case("build unknown grain search", *BUILD, "--grain-search", "random", names="'--grain-search'"),
    case("build output is a file", "build", "{model}", "-o", "{file}", names="-o {file}", watch=("{file}",)),
    case("build output dir missing", "build", "{model}", "-o", "{missing}/out", names="{missing}",
         watch=("{missing}",)),
    case("build option of another target", *BUILD, "--seqlen", "64", names="--seqlen: an option of --target sim"),
    case("build NaN calibration samples", "build", "{nan}", "-o", "{out}", "--grain-search", "even",
         names="sites.layers.0.q.samples: must be a finite", watch=("{nan}",)),
    case("sim seqlen 0", *SIM, "--seqlen", "0", names="--seqlen 0: must be at least 2"),
    case("sim seqlen 1", *SIM, "--seqlen", "1", names="--seqlen 1: must be at least 2"),
    case("sim windows 0", *SIM, "--windows", "0", names="--windows 0"),
    case("sim mask steps 0", *SIM, "--mask-steps", "0", names="--mask-steps 0"),
    case("sim unknown mode", *SIM, "--mode", "spiky", names="'--mode'"),
    case("sim unknown attention", *SIM, "--attention", "diagonal", names="'diagonal'"),
    case("sim unknown energy target", *SIM, "--energy-target", "tpu45", names="'tpu45'"),
    case("sim text missing", *SIM, "--text", "{missing}.txt", names="{missing}.txt"),
    case("sim site override unknown site", *SIM, "--site-timesteps", "final=6", names="site final"),
    case("nir option of lava", *BUILD, "--target", "nir", "--layers", "1",
         names="--layers: an option of --target lava"),
    case("lava layers reversed", *LAVA, "--layers", "5-3", names="--layers 5-3"),
    case("lava layers not a number", *LAVA, "--layers", "first", names="--layers first"),
    case("lava layers beyond the model", *LAVA, "--layers", "9", names="--layers 9: the model has decoder layers"),
    case("lava block of several layers", *LAVA, "--layers", "0-1", "--block", "mlp", names="--block mlp"),
    case("lava tokens 0", *LAVA, "--tokens", "0", names="--tokens 0"),
    case("lava tokens negative", *LAVA, "--tokens", "-3", names="--tokens -3"),
    case("onnx unknown form", *BUILD, "--target", "onnx", "--onnx-form", "spikes", names="'--onnx-form'"),
    case("onnx option of lava", *BUILD, "--target", "onnx", "--tokens", "3",
         names="--tokens: an option of --target lava"),
    # inspect
    case("inspect missing", "inspect", "{missing}", names="{missing}: no such model.pt file or IR folder"),
    case("inspect HF folder", "inspect", "{hf}", names="{hf}: a Hugging Face model folder", watch=("{hf}",)),
    case("inspect seq len 0", "inspect", "{model}", "--seq-len", "0", names="--seq-len 0"),
    case("inspect draw suffix", "inspect", "{model}", "--draw", "{out}.txt", names="--draw {out}.txt",
         watch=("{out}.txt",)),
    case("inspect draw dir missing", "inspect", "{model}", "--draw", "{missing}/layer.svg", names="{missing}"),
    case("inspect layer absent", "inspect", "{ir}", "--layer", "7", "--draw", "{out}.svg",
         names="--layer 7: no decoder layer 7", watch=("{out}.svg", "{ir}")),
    case("inspect json is a folder", "inspect", "{model}", "--json", "{ir}", names="{ir}: is a directory",
         watch=("{ir}",)),
    # report: measured mode
    case("report without input", "report", "-o", "{out}", names="give a sim.json"),
    case("report without -o", "report", "{sim}", names="'-o' / '--output'", watch=("{sim}",)),
    case("report of a model.pt", "report", "{model}", "-o", "{out}", names="a model.pt holds no simulation run"),
    case("report run missing", "report", "{missing}.json", "-o", "{out}", names="{missing}.json"),
    case("report run not JSON", "report", "{file}", "-o", "{out}", names="{file}: not valid JSON"),
    case("report both modes", *REPORT, "--config", "smollm2-135m", names="not both"),
    case("report analytic option with a run", *REPORT, "--seq-len", "64", names="--seq-len: an analytic-mode"),
    case("report site without model", *REPORT, "--site", "layers.0.silu", names="--site layers.0.silu: give --model"),
    case("report unknown site", *REPORT, "--site", "layers.0.bogus", "--model", "{model}",
         names="--site layers.0.bogus", watch=("{model}",)),
    case("report site of another model", *REPORT, "--site", "layers.0.silu", "--model", "{nan}",
         names="--model {nan}: the run was measured on another model"),
    case("report unknown energy target", *REPORT, "--energy-target", "tpu45", names="'tpu45'"),
    case("report output is a file", "report", "{sim}", "-o", "{file}", names="-o {file}", watch=("{file}",)),
    case("report output dir missing", "report", "{sim}", "-o", "{missing}/report", names="{missing}",
         watch=("{missing}",)),
    # report: analytic mode
    case("analytic without rates", *ANALYTIC, names="give the firing rates"),
    case("analytic unknown site kind", *ANALYTIC, "--rate", "softmax=0.1", names="--rate softmax=0.1"),
    case("analytic rate above 1", *ANALYTIC, *RATES, "--rate", "silu=1.5", names="--rate silu=1.5"),
    case("analytic rate NaN", *ANALYTIC, *RATES, "--rate", "silu=nan", names="--rate silu=nan"),
    case("analytic rate without value", *ANALYTIC, "--rate", "silu", names="--rate silu"),
    case("analytic rate missing a kind", *ANALYTIC, "--rate", "silu=0.1", names="no rate for site kind attn_norm"),
    case("analytic grains > T/2", *ANALYTIC, *RATES, "--grains", "4", names="--grains 4"),
    case("analytic T out of range", *ANALYTIC, *RATES, "-T", "2", names="-T: T=2"),
    case("analytic seq len 0", *ANALYTIC, *RATES, "--seq-len", "0", names="--seq-len 0"),
    case("analytic unknown attention", *ANALYTIC, *RATES, "--attention", "diag", names="'diag'"),
    case("analytic config missing", "report", "--config", "{missing}.json", *RATES, "-o", "{out}",
         names="{missing}.json"),
    case("analytic config not a config", "report", "--config", "{file}", *RATES, "-o", "{out}", names="{file}"),
    case("analytic rates file missing", *ANALYTIC, "--rates", "{missing}.json", names="{missing}.json"),
    # zeroshot
    case("zeroshot without task", "zeroshot", "{model}", names="'--task'", needs="lm_eval"),
    case("zeroshot task file missing", "zeroshot", "{model}", "--task", "copa={missing}.jsonl",
         names="{missing}.jsonl", needs="lm_eval"),
    case("zeroshot task without name", "zeroshot", "{model}", "--task", "={task}", names="--task ={task}",
         needs="lm_eval"),
    case("zeroshot task given twice", *ZEROSHOT, "--task", "copa={task}", names="task name 'copa' given twice",
         needs="lm_eval"),
    case("zeroshot gold out of range", "zeroshot", "{model}", "--task", "copa={bad_task}", names="gold",
         watch=("{bad_task}",), needs="lm_eval"),
    case("zeroshot limit 0", *ZEROSHOT, "--limit", "0", names="--limit 0", needs="lm_eval"),
    case("zeroshot batch size 0", *ZEROSHOT, "--batch-size", "0", names="--batch-size 0", needs="lm_eval"),
    case("zeroshot unknown mode", *ZEROSHOT, "--mode", "sparse", names="'--mode'", needs="lm_eval"),
    case("zeroshot built folder", "zeroshot", "{ir}", "--task", "copa={task}", names="zeroshot takes a model.pt",
         watch=("{ir}",), needs="lm_eval"),
    case("zeroshot json dir missing", *ZEROSHOT, "--json", "{missing}/z.json", names="{missing}/z.json",
         needs="lm_eval"),
    # tasks
    case("tasks file missing", "tasks", "{missing}.jsonl", "-o", "{out}", names="{missing}.jsonl", needs="lm_eval"),
    case("tasks output is a file", "tasks", "{task}", "-o", "{file}", names="-o {file}", watch=("{file}",),
         needs="lm_eval"),
    case("tasks output dir missing", "tasks", "{task}", "-o", "{missing}/tasks", names="{missing}",
         watch=("{missing}",), needs="lm_eval"),
    case("tasks bad name", "tasks", "a b={task}", "-o", "{out}", names="task name 'a b'", needs="lm_eval"),
    case("tasks without files", "tasks", "-o", "{out}", names="Missing argument", needs="lm_eval"),
]


def make_workspace(root: Path) -> dict[str, str]:
    """The files the cases read, under root (built once): placeholder name -> path."""
    import torch

    model = convert_tiny(root)
    paths = {"model": model, "hf": root / "tiny", "text": root / "calib.txt", "missing": root / "missing",
             "file": root / "notes.txt", "binary": root / "random.bin", "ir": root / "ir", "nan": root / "nan.pt",
             "task": root / "task.jsonl", "bad_task": root / "bad_task.jsonl",
             "toml_no_sites": root / "no_sites.toml", "toml_unknown_site": root / "unknown_site.toml"}
    paths["file"].write_text("some notes, not a model, a run or a config\n")
    paths["binary"].write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                    dtype=torch.uint8).tolist()))
    paths["task"].write_text('{"query": "The sky is", "choices": ["blue", "loud"], "gold": 0}\n' * 2)
    paths["bad_task"].write_text('{"query": "The sky is", "choices": ["blue", "loud"], "gold": 5}\n')
    paths["toml_no_sites"].write_text('[timesteps]\n"layers.0.q" = 6\n')
    paths["toml_unknown_site"].write_text('[sites]\n"layers.7.q" = 6\n')
    record = torch.load(model, weights_only=True)
    record["sites"]["layers.0.q"]["samples"][3] = float("nan")
    torch.save(record, paths["nan"])  # as a damaged file would be: save() itself refuses a record outside the schema
    _cli("build", str(model), "-o", str(paths["ir"]))
    sim = root / "sim"
    _cli("build", str(model), "-o", str(sim), "--target", "sim", "--mode", "decoded", "--windows", "1",
         "--seqlen", "32", "--text", str(paths["text"]), "--no-progress")
    paths["sim"] = sim / "sim.json"
    return {name: str(path) for name, path in paths.items()}


def _cli(*args: str) -> None:
    from click.testing import CliRunner

    from spikecompile.cli import cli

    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output


def slug(case_id: str) -> str:
    """The case's id as a file name and pytest id."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", case_id).strip("-")


def fill(text: str, paths: dict[str, str], out: str) -> str:
    return text.format(**paths, out=out)


def tree_digest(path: str) -> dict | str | None:
    """The bytes under `path`: None if absent, a file's sha256, or {relative path: sha256 or "dir"}."""
    root = Path(path)
    if not root.exists() and not root.is_symlink():
        return None
    if root.is_file():
        return hashlib.sha256(root.read_bytes()).hexdigest()
    return {str(entry.relative_to(root)): hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else "dir"
            for entry in sorted(root.rglob("*"))}


@dataclass
class Outcome:
    """What one case did: its exit status, stderr lines, the paths whose bytes changed."""

    exit_code: int
    stderr: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


def run_case(bad: Case, paths: dict[str, str], out_root: Path, subprocess_run: bool = False) -> Outcome:
    """Run one case (in-process through click's CliRunner, or as `python -m spikecompile`) with its paths
    snapshotted before and after."""
    out = str(out_root / slug(bad.id))
    args = [fill(arg, paths, out) for arg in bad.args]
    watched = sorted({fill(path, paths, out) for path in ("{out}", *bad.watch)})
    before = {path: tree_digest(path) for path in watched}
    if subprocess_run:
        env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "spikecompile", *args], capture_output=True, text=True,
                              env=env, timeout=300)
        exit_code, stderr = done.returncode, done.stderr
    else:
        from click.testing import CliRunner

        from spikecompile.cli import cli

        result = CliRunner().invoke(cli, args, prog_name="spikecompile")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a traceback a user would see
        exit_code, stderr = result.exit_code, result.stderr
    changed = [path for path in watched if tree_digest(path) != before[path]]
    return Outcome(exit_code, [line for line in stderr.splitlines() if line.strip()], changed)


def check_outcome(bad: Case, outcome: Outcome, paths: dict[str, str], out: str) -> None:
    expected = fill(bad.names, paths, out)
    lines = outcome.stderr
    assert outcome.exit_code == bad.exit_code, outcome.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    assert not any("Traceback" in line for line in outcome.stderr), outcome.stderr
    assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"
    assert not outcome.changed, f"changed: {outcome.changed}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("bad-inputs"))


def _skip_without(bad: Case):
    marks = []
    if bad.needs and importlib.util.find_spec(bad.needs) is None:
        marks.append(pytest.mark.skip(reason=f"needs {bad.needs}"))
    return pytest.param(bad, id=slug(bad.id), marks=marks)


def test_case_table_is_large_and_unique():
    assert len(CASES) >= 60
    assert len({bad.id for bad in CASES}) == len(CASES)
    assert {bad.args[0] for bad in CASES} == {"convert", "eval", "build", "inspect", "report", "zeroshot", "tasks"}
    targets = {bad.args[bad.args.index("--target") + 1] for bad in CASES if "--target" in bad.args}
    assert {"sim", "nir", "lava", "onnx"} <= targets


@pytest.mark.parametrize("bad", [_skip_without(bad) for bad in CASES])
def test_bad_input(bad, workspace, tmp_path):
    outcome = run_case(bad, workspace, tmp_path)
    check_outcome(bad, outcome, workspace, str(tmp_path / slug(bad.id)))


SUBPROCESS_CASES = ("build IR folder", "build site override unknown site", "convert calib seqlen 0",
                    "lava tokens negative", "report without -o", "analytic grains > T/2", "inspect HF folder")
"""A case per command family run as a real process: what the interpreter itself prints on stderr."""


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_process(name, workspace, tmp_path):
    bad = next(bad for bad in CASES if bad.id == name)
    outcome = run_case(bad, workspace, tmp_path, subprocess_run=True)
    check_outcome(bad, outcome, workspace, str(tmp_path / slug(bad.id)))


def test_no_option_check_waits_for_the_model(workspace, tmp_path):
    """README: option checks happen before the model loads. A bad option given together with a model.pt that
    cannot load (random bytes) must name the option, not the file."""
    for args, names in ((("build", "{binary}", "-o", "{out}", "-T", "20"), "--timesteps: T=20"),
                        (("build", "{binary}", "-o", "{out}", "--target", "sim", "--seqlen", "1"), "--seqlen 1"),
                        (("build", "{binary}", "-o", "{out}", "--site-timesteps", "layers.0.q=40"),
                         "site layers.0.q: T=40"),
                        (("eval", "{binary}", "--seqlen", "1"), "--seqlen 1"),
                        (("convert", "{missing}", "-o", "{out}", "--calib-seqlen", "0"), "--calib-seqlen 0")):
        bad = Case("early " + args[0], args, names=names)
        outcome = run_case(bad, workspace, tmp_path)
        check_outcome(bad, outcome, workspace, str(tmp_path / slug(bad.id)))
