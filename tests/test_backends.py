"""The backend registry and interface: load by name, one option list per target, names the CLI can share."""

import subprocess
import sys

import pytest

from spikecompile.backends import BY_TARGET, TARGETS, load
from spikecompile.errors import SpikecompileError


def test_an_unknown_target_is_one_line_naming_the_known_ones():
    with pytest.raises(SpikecompileError, match=r"^unknown target 'loihi'; known targets: ir, sim, nir, lava, onnx$"):
        load("loihi")


@pytest.mark.parametrize("target", TARGETS)
def test_every_backend_exposes_the_interface(target):
    backend = load(target)
    assert backend.OPTIONS is BY_TARGET[target]
    assert all(callable(getattr(backend, name)) for name in ("check", "build", "report_lines"))
    defaults = {option.name: option.default for option in backend.OPTIONS}
    assert set(backend.check(defaults)) >= set(defaults)


def test_an_option_name_shared_by_targets_has_one_type():
    """Targets may share a name (--text of sim and lava) as one command-line option: it must parse the same way."""
    types = {}
    for options in BY_TARGET.values():
        names = [option.name for option in options]
        assert len(names) == len(set(names))
        for option in options:
            assert types.setdefault(option.name, option.type) == option.type, option.name


def test_the_registry_imports_no_backend():
    code = "import sys, spikecompile.backends, spikecompile.cli; print(sorted(m for m in sys.modules if 'torch' in m " \
           "or m.startswith('spikecompile.backends.') and m != 'spikecompile.backends.options'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
