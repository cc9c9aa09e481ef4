import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import coreml_sd
from coreml_sd.cli import main
from helpers import one_line_error, run_python


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"coreml-sd, version {coreml_sd.__version__}"


def test_help_lists_group() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "Stable Diffusion on Apple Silicon" in result.output


def test_unknown_command_fails() -> None:
    result = CliRunner().invoke(main, ["no-such-command"])
    assert result.exit_code != 0
    assert "No such command" in result.output


def test_every_command_is_registered() -> None:
    assert set(main.commands) == {"convert", "generate", "check", "bench", "report", "demo"}


def test_ctrl_c_in_a_command_without_its_own_handler_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not click's "Aborted!" and exit 1: a shell reads 130 as "stopped by SIGINT"."""
    import coreml_sd.benchmarks.report as report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "load_records", interrupted)
    (tmp_path / "r.json").write_text("{}")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "r.json"), "-o", str(tmp_path / "r.md")])
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted" and "Aborted" not in result.output


def test_a_missing_command_module_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken tree or install must not ship a `coreml-sd` that silently lacks a command."""
    import coreml_sd.cli as cli

    monkeypatch.setattr(cli, "_COMMANDS", (*cli._COMMANDS, ("coreml_sd.no_such_stage", "command")))
    with pytest.raises(ModuleNotFoundError, match="coreml_sd.no_such_stage"):
        cli._register()


# ------------------------------------------------------------------ a base install (no torch)


# Makes ``import torch`` fail in a child as on a base install: a None entry in sys.modules makes
# every import of it raise ModuleNotFoundError, and of everything that imports it (diffusers,
# transformers).
BLOCK_TORCH = "import sys\nsys.modules['torch'] = None\n"


def run_cli(*args: str, torch_importable: bool) -> subprocess.CompletedProcess:
    """``coreml-sd ARGS`` in a fresh interpreter; unless ``torch_importable``, with BLOCK_TORCH."""
    block = "" if torch_importable else BLOCK_TORCH
    return run_python(f"{block}from coreml_sd.cli import main\nmain(prog_name='coreml-sd')\n", *args)


@pytest.mark.parametrize("module", ["torch", "coreml_sd.models"])
def test_torch_is_really_blocked_in_the_child(module: str) -> None:
    result = run_python(f"{BLOCK_TORCH}import {module}\n")
    assert result.returncode != 0
    assert "ModuleNotFoundError: import of torch halted" in result.stderr


@pytest.mark.parametrize("torch_importable", [False, True])
def test_convert_on_a_base_install(tmp_path: Path, torch_importable: bool) -> None:
    """Without torch: one line naming the extra. With it, the same command gets past that check
    to the next one (the source does not exist): the check is what answered."""
    out = tmp_path / "b"
    result = run_cli("convert", str(tmp_path / "no-such-model"), "-o", str(out), torch_importable=torch_importable)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    if torch_importable:
        assert "does not exist" in last
    else:
        assert last.startswith("Error: convert needs the convert extra (")
        assert last.endswith("torch halted; None in sys.modules): pip install 'coreml-sd[convert]'")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_demo_on_a_base_install(tmp_path: Path) -> None:
    result = run_cli("demo", "-o", str(tmp_path / "demo"), torch_importable=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: demo needs the convert extra (")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("flag", ["-o", "--output", "--dir"])
def test_demo_output_that_is_a_file(tmp_path: Path, flag: str) -> None:
    """A file where the working folder should be: one line naming it, before any work (it ended in
    a traceback). --dir is the hidden old name of -o/--output."""
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    one_line_error(CliRunner().invoke(main, ["demo", flag, str(taken)]), f"output {taken} is a file", "with -o")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and taken.read_text() == "mine"


def test_demo_takes_generates_names() -> None:
    """demo names its options as generate does: a positional PROMPT and -o/--output; the old
    --dir and --prompt still work but are out of --help, and cannot be given with the new ones."""
    help_text = CliRunner().invoke(main, ["demo", "--help"]).output
    assert "[PROMPT]" in help_text and "-o, --output DIR" in help_text
    assert "--dir" not in help_text and "--prompt" not in help_text
    both = CliRunner().invoke(main, ["demo", "a cat", "--prompt", "a dog"])
    assert both.exit_code == 2 and "--prompt is the old name of PROMPT: give only PROMPT" in both.stderr


# ------------------------------------------------------------------ the README's first command


def test_demo_builds_converts_and_generates(tmp_path: Path) -> None:
    """`coreml-sd demo` as README's first command runs it (fewer steps): a PNG with its generation
    parameters; a second run reuses the model and every converted component and writes a new
    file beside the first, never over it."""
    from PIL import Image

    from coreml_sd.runtime.image import read_parameters

    root = tmp_path / "demo"
    first = CliRunner().invoke(main, ["demo", "a red barn", "-o", str(root), "--steps", "2"])
    assert first.exit_code == 0, first.output
    assert "Running MIL" not in first.stderr and "Loading weights" not in first.stderr  # only our progress lines
    png = Path(first.stdout.strip().splitlines()[-1].removeprefix("image written to "))
    assert png.parent == root / "images" and png.is_file()
    assert Image.open(png).size == (256, 256)
    assert read_parameters(png).startswith("a red barn\n") and "Steps: 2, Sampler: " in read_parameters(png)
    second = CliRunner().invoke(main, ["demo", "--output", str(root), "--steps", "2", "--prompt", "a red barn"])
    assert second.exit_code == 0, second.output
    assert second.stderr.count("unchanged: reused") == 4 and "building a tiny" not in second.stderr
    again = Path(second.stdout.strip().splitlines()[-1].removeprefix("image written to "))
    assert again != png and again.read_bytes() == png.read_bytes()  # same seed, same image, new file
