"""The `coreml-sd` command: a click group that only assembles the stages' commands.

Each stage owns its command (`convert/cli.py`, `runtime/cli.py`, `benchmarks/cli.py`)
and imports heavy dependencies (torch, coremltools) inside the command body, so that
`coreml-sd --help` is instant and the runtime path never imports torch.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading

import click

from . import __version__

# (module, attribute) of each subcommand, in the order --help lists them.
_COMMANDS = (
    ("coreml_sd.convert.cli", "convert"),
    ("coreml_sd.runtime.cli", "generate"),
    ("coreml_sd.runtime.check", "check"),
    ("coreml_sd.benchmarks.cli", "bench"),
    ("coreml_sd.benchmarks.cli", "report"),
    ("coreml_sd.demo", "demo"),
)


class _Group(click.Group):
    """Ctrl-C works, and exits 130, in every command, however the process was started."""

    def main(self, *args, **kwargs):
        # A shell without job control (a script, CI) starts `cmd &` with SIGINT ignored, and
        # Python then leaves it ignored: a Ctrl-C sent to the process group would be lost, and a
        # child process (bench's) would inherit the ignore. Python's own handler is put back.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return super().main(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # a command without its own handler: no "Aborted!" and exit 1
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="coreml-sd")
def main() -> None:
    """Stable Diffusion on Apple Silicon: convert to Core ML once, generate fast."""


def _register() -> None:
    # A missing module or command is a broken install or a broken tree: fail loudly, never ship a
    # `coreml-sd` that silently lacks a command.
    for module_name, attr in _COMMANDS:
        main.add_command(getattr(importlib.import_module(module_name), attr))


_register()
