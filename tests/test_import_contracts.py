"""The import contracts of pyproject.toml ([tool.importlinter], run by `make test` as lint-imports) hold on this tree,
and each of them breaks when the import it forbids is added: a contract that cannot fail guards nothing."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (the test extra)")

# contract id -> (module added under spikecompile/, its source, a module that imports it back or None)
VIOLATIONS = {
    "layers": ("neuron/_violation.py", "import spikecompile.conversion\n", None),
    "ir-below-conversion": ("ir/_violation.py", "import spikecompile.frontend\n", None),
    "backends-independent": ("backends/nir/_violation.py", "import spikecompile.backends.onnx\n", None),
    "backends-below-build": ("backends/sim/_violation.py", "import spikecompile.cli\n", None),
    "acyclic": ("conversion/_violation.py", "import spikecompile.conversion.convert\n", "conversion/convert.py"),
}


def lint_imports(tree: Path, contract: str | None = None) -> subprocess.CompletedProcess:
    selection = ["--contract", contract] if contract else []
    return subprocess.run([str(LINT_IMPORTS), str(tree / "pyproject.toml"), "--no-cache", "--no-logo", *selection],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the package (backends/ and targets/ through their symlinks) and pyproject.toml."""
    copy = tmp_path_factory.mktemp("tree")
    shutil.copytree(ROOT / "spikecompile", copy / "spikecompile", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    return copy


def test_every_contract_has_a_violation_here():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert {contract["id"] for contract in contracts} == set(VIOLATIONS)


def test_the_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize("contract", VIOLATIONS)
def test_each_contract_breaks_on_the_import_it_forbids(tree, contract):
    file, source, importer = VIOLATIONS[contract]
    assert lint_imports(tree, contract).returncode == 0
    added = tree / "spikecompile" / file
    added.write_text(source)
    back = tree / "spikecompile" / importer if importer else None
    original = back.read_text() if back else None
    if back:
        back.write_text(original + f"\nfrom . import {added.stem}  # noqa: E402\n")
    try:
        result = lint_imports(tree, contract)
    finally:
        added.unlink()
        if back:
            back.write_text(original)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-3000:]


def test_no_module_outside_the_ir_reaches_into_the_networkx_graph():
    """Graph's operations are the interface: only spikecompile/ir/ touches Graph.nx (the networkx graph)."""
    here = Path(__file__).resolve()
    files = [path for folder in ("spikecompile", "backends", "tests", "bench") for path in (ROOT / folder).rglob("*.py")
             if path.resolve() != here and "spikecompile/ir" not in path.as_posix()
             and not path.is_relative_to(ROOT / "spikecompile" / "backends")]
    reaching = [f"{path.relative_to(ROOT)}:{number}" for path in files
                for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                if re.search(r"\.nx\b", line)]
    assert not reaching, reaching
