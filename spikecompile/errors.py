"""User-facing errors: one line that names the file, site, node or option at fault and what to do."""


class SpikecompileError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (signal_number), raised like Ctrl-C's KeyboardInterrupt so that every clean-up runs; the CLI
    prints it as one line and exits with 128 + signal_number."""

    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.signal_number = signal_number
