"""lava-nc 0.10 on Python 3.11: an in-memory fix of its one incompatibility (standard library only).

lava/magma/compiler/var_model.py gives three dataclasses ByteEncoder() instances as field defaults:

    x: ByteEncoder = ByteEncoder()

which Python 3.11 rejects ("mutable default ... use default_factory"). install() puts a sys.meta_path finder in
front of the import system that, for that one module only, reads its source, rewrites each such default on the
same line (line numbers kept; no import added: the module starts with `from __future__ import annotations`)

    x: ByteEncoder = __import__("dataclasses").field(default_factory=ByteEncoder)

then compiles and runs it (never from a stale bytecode cache). site-packages is never changed. A source that
is already fixed is left as it is; a source with neither form raises ImportError naming the file.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import re
import sys

MODULE = "lava.magma.compiler.var_model"
DEFAULT = re.compile(r"^(\s+\w+\s*:\s*ByteEncoder\s*=\s*)ByteEncoder\(\)(\s*(?:#.*)?)$", re.MULTILINE)
FIXED = 'default_factory=ByteEncoder'


def patch_source(source: str, path: str) -> str:
    """The module source with every `= ByteEncoder()` default made a default_factory, line for line."""
    patched, count = DEFAULT.subn(rf'\1__import__("dataclasses").field({FIXED})\2', source)
    if count == 0 and FIXED not in source:
        raise ImportError(f"{path}: the ByteEncoder() dataclass defaults that spikecompile's Lava fix rewrites "
                          f"are not there; this lava-nc is not the 0.10.0 the fix was written for "
                          f"(install lava-nc==0.10.0, see scripts/install.sh)")
    return patched


class _PatchingLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):
        source = self.get_data(self.path).decode("utf-8")
        return compile(patch_source(source, self.path), self.path, "exec", dont_inherit=True)


class PatchFinder(importlib.abc.MetaPathFinder):
    """Finds `module` on the normal path and loads it through patch_source."""

    def __init__(self, module: str = MODULE):
        self.module = module

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _PatchingLoader(fullname, spec.origin)
        return spec


def install(module: str = MODULE) -> None:
    """Put the finder first on sys.meta_path (once per module name); call before the first lava import."""
    if not any(isinstance(finder, PatchFinder) and finder.module == module for finder in sys.meta_path):
        sys.meta_path.insert(0, PatchFinder(module))
