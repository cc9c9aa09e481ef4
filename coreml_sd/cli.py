"""The `coreml-sd` command: a click group that only assembles the stages' commands.

Each stage owns its command (`convert/cli.py`, `runtime/cli.py`, `benchmarks/cli.py`)
and imports heavy dependencies (torch, coremltools) inside the command body, so that
`coreml-sd --help` is instant and the runtime path never imports torch.
"""

from __future__ import annotations

import importlib

import click

from . import __version__

# (module, attribute) of each subcommand, in the order --help lists them.
_COMMANDS = (
    ("coreml_sd.convert.cli", "convert"),
    ("coreml_sd.runtime.cli", "generate"),
    ("coreml_sd.benchmarks.cli", "bench"),
    ("coreml_sd.benchmarks.cli", "report"),
    ("coreml_sd.demo", "demo"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="coreml-sd")
def main() -> None:
    """Stable Diffusion on Apple Silicon: convert to Core ML once, generate fast."""


def _register() -> None:
    # A missing module or command is a broken install or a broken tree: fail loudly, never ship a
    # `coreml-sd` that silently lacks a command.
    for module_name, attr in _COMMANDS:
        main.add_command(getattr(importlib.import_module(module_name), attr))


_register()
