"""Every output whole or absent: SIGINT and SIGTERM at several points of `convert` and of each `build` target, a full
disk (a small tmpfs in a private mount namespace), and the modes files and folders get under the umask.

The CLI runs as a real subprocess on a tiny converted model. A signal is sent at a point the test observes from
outside (POINTS); there the process is stopped (SIGSTOP) so the point cannot pass before the signal is queued. Each
run asserts the exit status, one stderr line, the target byte for byte as before, and no temporary sibling left.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FAST_CONVERT, convert_tiny

from spikecompile.cli import cli
from spikecompile.errors import SpikecompileError
from spikecompile.files import atomic_folder, atomic_write, signals_held

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
"""The CLI's environment: the checkout first."""
POLL_S = 0.0005
"""How often the output's parent is listed while waiting for a write to start."""
COMPUTING_CPU_S = 3.5
"""CPU seconds after which a command is past its imports (~2 s) and not yet writing (convert ~6 s, sim ~9 s)."""
POINTS = ("loading", "computing", "writing")
"""Where a signal is sent: as the command starts (importing torch), once it has used COMPUTING_CPU_S of CPU but
written nothing (loading, calibrating, fitting, simulating), or while its temporary output exists and holds a file."""
BUILDS = {"ir": (), "sim": ("--windows", "1", "--seqlen", "32", "--text", None, "--no-progress"),
          "nir": (), "lava": ("--layers", "0"), "onnx": ("--onnx-form", "decoded")}
"""Each target's options that keep a tiny build short (None: the text file)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A converted tiny model, its source folder and calibration text (one conversion for the module)."""
    root = tmp_path_factory.mktemp("interrupt")
    model = convert_tiny(root)
    return {"model": model, "source": root / "tiny", "text": root / "calib.txt"}


def _command(tiny, action, output):
    """The CLI arguments of `action` ("convert" or a build target) writing `output`."""
    if action == "convert":
        # more samples per site: a model.pt of a few MB, whose write lasts long enough to be caught
        return ["convert", str(tiny["source"]), "-o", str(output), "-T", "6", "--calib", str(tiny["text"]),
                *FAST_CONVERT, "--samples-per-site", "8192"]
    options = [str(tiny["text"]) if value is None else value for value in BUILDS[action]]
    return ["build", str(tiny["model"]), "--target", action, "-o", str(output), *options]


def _state(path: Path):
    """path byte for byte: None if absent, a file's bytes, or a folder's {relative path: bytes or "dir"}."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(entry.relative_to(path)): entry.read_bytes() if entry.is_file() else "dir"
            for entry in sorted(path.rglob("*"))}


def _siblings(path: Path) -> list[str]:
    """Temporary siblings of path (".NAME.<random>.tmp" / ".old")."""
    return sorted(entry.name for entry in path.parent.iterdir() if entry.name.startswith(f".{path.name}."))


def _handler_installed(pid: int) -> bool:
    """The CLI's SIGTERM handler is in place (/proc/PID/status SigCgt has SIGTERM's bit)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def _loading(pid: int) -> bool:
    """The command runs: torch is mapped into the process (the CLI imports it only inside a command)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _writing(output: Path) -> bool:
    """A temporary sibling of output exists (a file, or a folder holding at least one file)."""
    for name in _siblings(output):
        temp = output.parent / name
        if temp.is_file() or any(entry.is_file() for entry in temp.rglob("*")):
            return True
    return False


def _interrupt(arguments, output: Path, number: int, point: str, prepare, tries: int = 5):
    """Run the CLI on the target prepare() put in place, send signal `number` at `point` (POINTS); the finished
    process. A point the process passed before it could be stopped is tried again (up to `tries` runs)."""
    for _ in range(tries):
        prepare()
        before = _state(output)
        with open(output.parent / "stderr.txt", "w+") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "spikecompile", *arguments], env=ENV, cwd=output.parent,
                                       stdout=subprocess.DEVNULL, stderr=stderr)
            reached = _reach(process, output, point, lambda: _state(output) == before and not _siblings(output))
            if reached:
                process.send_signal(number)
            process.send_signal(signal.SIGCONT)
            returncode = process.wait(timeout=300)
            stderr.seek(0)
            text = stderr.read()
        if reached:
            return subprocess.CompletedProcess(arguments, returncode, "", text)
        assert returncode == 0, text  # it finished first: clear the way and try again
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    pytest.fail(f"the process never stayed at {point!r} long enough to be signalled ({tries} runs)")


def _reach(process, output: Path, point: str, before_writing) -> bool:
    """Wait for `point`; stopped there (SIGSTOP) unless it is "loading": whether the process is at it."""
    if not _wait(process, lambda: _handler_installed(process.pid) and _loading(process.pid), 0.01):
        return False
    if point == "computing":
        reached = _wait(process, lambda: _cpu_seconds(process.pid) >= COMPUTING_CPU_S, 0.01)
        process.send_signal(signal.SIGSTOP)
        return reached and before_writing()
    if point == "writing":
        reached = _wait(process, lambda: _writing(output), POLL_S)
        process.send_signal(signal.SIGSTOP)
        return reached and _writing(output)  # still mid-write now that it is stopped
    return True


def _cpu_seconds(pid: int) -> float:
    """CPU time the process has used, all threads (/proc/PID/stat utime + stime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(process, condition, poll_s: float) -> bool:
    """Poll until condition() holds (True) or the process ends (False)."""
    while process.poll() is None:
        if condition():
            return True
        time.sleep(poll_s)
    return False


def _check_interrupted(finished, output: Path, before, number: int) -> None:
    lines = finished.stderr.splitlines()
    assert finished.returncode == 128 + number, finished.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: interrupted by {signal.Signals(number).name}"), lines
    assert f"nothing was written to {output}" in lines[0]
    assert _state(output) == before
    assert _siblings(output) == []


def _existing(output: Path, action: str) -> None:
    """An earlier output in output's place: a model.pt's bytes, or a folder with a file of this target and another."""
    if action == "convert":
        output.write_bytes(b"an earlier model.pt")
        return
    output.mkdir()
    (output / "notes.txt").write_text("kept\n")
    (output / {"ir": "graph.json", "sim": "sim.json", "nir": "manifest.json", "lava": "network.json",
               "onnx": "onnx.json"}[action]).write_text("{}\n")


def _case(action, number, point, existing, slow=False):
    marks = [pytest.mark.slow] if slow else []
    name = f"{action}-{signal.Signals(number).name}-{point}-{'existing' if existing else 'absent'}"
    return pytest.param(action, number, point, existing, marks=marks, id=name)


INTERRUPTIONS = [
    _case("convert", signal.SIGINT, "writing", True),
    _case("convert", signal.SIGTERM, "loading", False),
    _case("convert", signal.SIGTERM, "computing", True),
    _case("ir", signal.SIGTERM, "writing", True),
    _case("nir", signal.SIGINT, "writing", False),
    _case("convert", signal.SIGTERM, "writing", False, slow=True),
    _case("convert", signal.SIGINT, "loading", True, slow=True),
    _case("ir", signal.SIGINT, "writing", False, slow=True),
    _case("ir", signal.SIGINT, "loading", True, slow=True),
    _case("nir", signal.SIGTERM, "writing", True, slow=True),
    *[_case(target, number, "writing", existing, slow=True)
      for target in ("sim", "lava", "onnx") for number, existing in ((signal.SIGINT, False), (signal.SIGTERM, True))],
    _case("sim", signal.SIGTERM, "computing", False, slow=True),
    _case("convert", signal.SIGINT, "computing", False, slow=True),
]


@pytest.mark.parametrize(("action", "number", "point", "existing"), INTERRUPTIONS)
def test_an_interruption_leaves_the_target_as_it_was(tiny, tmp_path, action, number, point, existing):
    output = tmp_path / ("model.pt" if action == "convert" else "out")
    prepare = (lambda: _existing(output, action)) if existing else (lambda: None)
    prepare()
    before = _state(output)
    shutil.rmtree(output) if output.is_dir() else output.unlink(missing_ok=True)
    finished = _interrupt(_command(tiny, action, output), output, number, point, prepare)
    _check_interrupted(finished, output, before, number)


# ---- a full disk ---------------------------------------------------------------------------------------------------

def _namespaces_unavailable() -> str | None:
    """Why a tmpfs cannot be mounted in a private mount namespace here, or None."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount is not installed"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -m fails here: {probe.stderr.strip()}"
    return None


STATE_SCRIPT = """import hashlib, os, sys
for folder, names, files in sorted(os.walk(sys.argv[1])):
    names.sort()
    for name in sorted(files):
        path = os.path.join(folder, name)
        print(os.path.relpath(path, sys.argv[1]), hashlib.sha256(open(path, "rb").read()).hexdigest())
    for name in names:
        print(os.path.relpath(os.path.join(folder, name), sys.argv[1]) + "/")
"""


def _on_full_disk(tmp_path, arguments, prepare: str, free_kib: int):
    """Run the CLI with cwd on a 2 MiB tmpfs (private mount namespace) that `prepare` (shell) populates, filled up to
    `free_kib` KiB free; (exit status, stderr, the tmpfs listing before, after)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = f"""set -e
mount -t tmpfs -o size=2m tmpfs {disk}
cd {disk}
{prepare}
head -c $(( $(df -k --output=avail . | tail -1) * 1024 - {free_kib} * 1024 )) /dev/zero > filler
"$PY" -c "$STATE" . > {tmp_path}/before.txt
set +e
"$PY" -m spikecompile "$@" 2> {tmp_path}/stderr.txt
echo $? > {tmp_path}/rc.txt
"$PY" -c "$STATE" . > {tmp_path}/after.txt
"""
    env = {**ENV, "PY": sys.executable, "STATE": STATE_SCRIPT}
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *arguments], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    read = lambda name: (tmp_path / name).read_text()  # noqa: E731
    return int(read("rc.txt")), read("stderr.txt"), read("before.txt"), read("after.txt")


FULL_DISKS = {
    # action: (shell that puts an earlier output on the disk, KiB left free)
    "convert": ("printf 'an earlier model.pt' > model.pt", 200),
    "ir": ("mkdir out && echo kept > out/notes.txt && echo '{}' > out/graph.json", 100),
    "nir": ("", 600),
}


@pytest.mark.skipif(_namespaces_unavailable() is not None, reason=str(_namespaces_unavailable()))
@pytest.mark.parametrize("action", list(FULL_DISKS))
def test_a_full_disk_is_one_line_and_leaves_the_target_as_it_was(tiny, tmp_path, action):
    prepare, free_kib = FULL_DISKS[action]
    target = "model.pt" if action == "convert" else "out"
    returncode, stderr, before, after = _on_full_disk(tmp_path, _command(tiny, action, target), prepare, free_kib)
    lines = stderr.splitlines()
    assert returncode == 2, stderr  # not 139: HDF5 never meets the full disk
    assert len(lines) == 1 and lines[0].startswith(f"error: {target}") and lines[0].endswith(
        "writing failed (No space left on device); nothing was written"), stderr
    assert after == before  # the earlier output byte for byte, or still absent; no temporary sibling


# ---- in-process: atomic_folder, signals_held, modes ----------------------------------------------------------------

def test_atomic_folder_replaces_what_it_writes_and_keeps_the_rest(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("old")
    (out / "notes.txt").write_text("kept")
    (out / "sub" / "old.bin").write_bytes(b"kept too")
    with atomic_folder(out) as folder:
        assert folder.parent == tmp_path and folder.name.startswith(".out.") and list(folder.iterdir()) == []
        (folder / "a.txt").write_text("new")
        (folder / "sub").mkdir()
        (folder / "sub" / "new.bin").write_bytes(b"new")
        assert _state(out)["a.txt"] == b"old"  # nothing visible until the block ends
    assert _state(out) == {"a.txt": b"new", "notes.txt": b"kept", "sub": "dir", "sub/new.bin": b"new",
                           "sub/old.bin": b"kept too"}
    assert _siblings(out) == []


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt(),
                                     SpikecompileError("{temp}/graph.json: bad")])
def test_atomic_folder_failure_leaves_the_target_as_it_was(tmp_path, failure):
    out = tmp_path / "out"
    out.mkdir()
    (out / "graph.json").write_text("earlier")
    before = _state(out)
    with pytest.raises((SpikecompileError, KeyboardInterrupt)) as raised:
        with atomic_folder(out) as folder:
            (folder / "graph.json").write_text("half")
            if isinstance(failure, SpikecompileError):
                failure = SpikecompileError(str(failure).format(temp=folder))
            raise failure
    assert _state(out) == before and _siblings(out) == []
    if isinstance(failure, OSError):
        assert str(raised.value) == f"{out}: writing failed (No space left on device); nothing was written"
    if isinstance(failure, SpikecompileError):
        assert str(raised.value) == f"{out}/graph.json: bad"  # the target named, not the temporary folder


def test_atomic_folder_refuses_the_current_folder_and_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path, message in ((".", "is the current folder"), (str(tmp_path.parent), "is the current folder"),
                          ("missing/out", "does not exist")):
        with pytest.raises(SpikecompileError, match=message):
            with atomic_folder(path):
                pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpikecompileError, match="exists and is not a folder"):
        with atomic_folder("file"):
            pass
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["file"]


def test_an_interruption_turned_into_another_error_is_still_one_line(monkeypatch):
    """A signal that arrives during an import can come out of a C extension's module init as "ImportError:
    initialization failed" (scipy's highspy, in a clean-clone CI run): the command still ends with the
    interruption's one line and exit status, not a traceback."""
    import click

    from spikecompile import cli as cli_module
    from spikecompile import files

    monkeypatch.setattr(files, "_interruptions", [])  # this process's record of signals received, fresh

    @click.group(cls=cli_module._Group)
    def group():
        pass

    @group.command()
    def work():
        try:
            files.interrupt(signal.SIGTERM)
        except KeyboardInterrupt as error:
            raise ImportError("initialization failed") from error

    @group.command()
    def fail():
        raise ImportError("a real import error")

    result = CliRunner().invoke(group, ["work"])
    assert result.exit_code == 143 and result.output.strip() == "error: interrupted by SIGTERM"
    files._interruptions.clear()
    result = CliRunner().invoke(group, ["fail"])  # without a signal, an error stays the error it is
    assert isinstance(result.exception, ImportError) and str(result.exception) == "a real import error"


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test: a runner started in the background by a shell without job
    control inherits SIGINT ignored, and Python then keeps it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_signals_held_delivers_sigint_after_the_block(default_sigint):
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs handlers between bytecodes: the held one would have run by now
            reached.append("end of block")
    assert reached == ["end of block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.fixture
def umask():
    """Set the process umask for the test (the value given), restored after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_files_and_folders_respect_the_umask(tmp_path, umask, mask, file_mode, folder_mode):
    umask(mask)
    atomic_write(tmp_path / "file.txt", lambda temp: Path(temp).write_text("x"))
    with atomic_folder(tmp_path / "out") as folder:
        atomic_write(folder / "inside.txt", lambda temp: Path(temp).write_text("x"))
        (folder / "sub").mkdir()
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.rglob("*")}
    assert modes == {"file.txt": file_mode, "out": folder_mode, "inside.txt": file_mode, "sub": folder_mode}


def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "model.pt"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write(path, lambda temp: Path(temp).write_text("new"))
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640


def test_build_output_respects_the_umask(tiny, tmp_path, umask):
    umask(0o002)
    out = tmp_path / "nir"
    result = CliRunner().invoke(cli, ["build", str(tiny["model"]), "--target", "nir", "-o", str(out)])
    assert result.exit_code == 0, result.output
    modes = {path.stat().st_mode & 0o777 for path in [out, *out.rglob("*")] if path.is_dir()}
    modes_of_files = {path.stat().st_mode & 0o777 for path in out.rglob("*") if path.is_file()}
    assert modes == {0o775} and modes_of_files == {0o664}
    assert _siblings(out) == []
