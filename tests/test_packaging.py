"""pyproject lists every package (the explicit list is what maps backends/ and targets/ under spikecompile)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"spikecompile": "spikecompile", "backends": "spikecompile.backends", "targets": "spikecompile.targets"}


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for folder, package in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found == set(config["packages"])
    assert {config["package-dir"][package] for package in ("spikecompile.backends", "spikecompile.targets")} == \
        {"backends", "targets"}
