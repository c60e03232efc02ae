"""Backends (imported as spikecompile.backends): one subpackage per target, each only lowering IR nodes.

Looked up lazily by name (spikecompile.backends.load), so `import spikecompile` imports no optional package.
"""
