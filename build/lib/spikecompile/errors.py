"""User-facing errors: one line that names the file, site, node or option at fault and what to do."""


class SpikecompileError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""
