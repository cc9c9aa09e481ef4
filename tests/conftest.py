"""Opt-in markers: hardware- or time-hungry tests run only when asked for.

`macos` tests exercise Core ML itself and need a Mac (`--run-macos`); `slow` tests use
full-size architectures (`--run-slow`). Both are reported as skipped with the flag
that enables them, never silently dropped.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

# Each xdist worker takes one core: with torch's default of a thread per core, N workers on N
# cores fight over them (conversions and parity runs are torch-heavy). Set before any test module
# imports torch, and inherited by the CLIs the tests start.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-macos", action="store_true", help="run tests that need macOS and Core ML")
    parser.addoption("--run-slow", action="store_true", help="run full-size / long tests")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--run-macos") and sys.platform != "darwin":
        raise pytest.UsageError("--run-macos needs macOS: Core ML prediction does not exist elsewhere")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gates = {"macos": "--run-macos", "slow": "--run-slow"}
    for item in items:
        for marker, flag in gates.items():
            if marker in item.keywords and not config.getoption(flag):
                item.add_marker(pytest.mark.skip(reason=f"{marker}: enable with {flag}"))


def pytest_collection_finish(session: pytest.Session) -> None:
    # In an xdist worker under --dist loadgroup, each test marked xdist_group must carry its
    # group in its node id, or its module's shared fixtures are built on every worker (pytest
    # 9.2 with pytest-xdist 3.8 drop it silently: pyproject.toml's pin).
    if getattr(session.config.option, "loadgroup", False):
        lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
        if lost:
            raise pytest.UsageError(f"pytest-xdist did not group {lost[0]} (pytest {pytest.__version__}): "
                                    "install the pytest pyproject.toml pins")
    # Collection imported torch, coremltools, diffusers and transformers: half a million objects
    # that live as long as the session. Freezing them keeps every full garbage collection from
    # walking them again: the converter's own gc.collect() calls (four per package, to free the
    # MIL graphs' cycles at once) cost 0.25 s each in a test process otherwise. What the tests
    # create later is collected as usual.
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory: pytest.TempPathFactory):
    """The suite writes nothing outside temporary folders: caches that tools keep under the
    user's home (the runtime's sha256 cache under XDG_CACHE_HOME, matplotlib's) go to this
    session's temporary folder, for the tests' own processes and the CLIs they start."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
    patch.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))
    yield
    patch.undo()


# ---------------------------------------------------------------------------- tiny models
#
# Tiny pipelines and bundles are built once per test session and shared by every xdist worker:
# they live under the session's common temporary root and each is built under a file lock by
# whichever worker asks first (a bundle's manifest names its source folder, so both must be the
# same folder for every worker).


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    root = tmp_path_factory.getbasetemp()
    return (root.parent if worker_id != "master" else root) / "shared"


def _once(target: Path, build) -> Path:
    """Build ``target`` (a directory) once across workers; ``build(target)`` must create it."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    done = target.with_name(target.name + ".done")  # beside, not inside: the tree stays as built
    with FileLock(str(target) + ".lock"):
        if not done.exists():
            build(target)
            done.touch()
    return target


def _need_clip_vocab() -> None:
    from coreml_sd.testing.clip_vocab import find_clip_bpe

    try:
        find_clip_bpe()
    except FileNotFoundError as e:  # the vocabulary's only source, installed by ./dev
        pytest.fail(str(e))


def _tiny_dir(shared_dir: Path, family: str) -> Path:
    from coreml_sd.testing.tiny_pipelines import build_tiny_pipeline

    _need_clip_vocab()
    return _once(shared_dir / f"tiny_{family}", lambda t: build_tiny_pipeline(t, family))


def _tiny_sdxl_dir(shared_dir: Path, name: str, **options) -> Path:
    from coreml_sd.testing.tiny_pipelines import build_tiny_sdxl_pipeline

    _need_clip_vocab()
    return _once(shared_dir / name, lambda t: build_tiny_sdxl_pipeline(t, **options))


def _turbo_from_base(base: Path, target: Path) -> None:
    """The base pipeline with SDXL-Turbo's scheduler config. Copied with modification times, so
    its models have the base's fingerprints and a conversion reuses the base bundle's packages."""
    from coreml_sd.testing.tiny_pipelines import SDXL_TURBO_SCHEDULER_CONFIG

    shutil.copytree(base, target, copy_function=shutil.copy2)
    (target / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_TURBO_SCHEDULER_CONFIG, indent=2))
    index = json.loads((target / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", SDXL_TURBO_SCHEDULER_CONFIG["_class_name"]]
    (target / "model_index.json").write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="session")
def tiny_sd1_dir(shared_dir: Path) -> Path:
    """A tiny SD 1.x diffusers folder (seed 0). Read-only: copy it before changing anything."""
    return _tiny_dir(shared_dir, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_dir(shared_dir: Path) -> Path:
    """A tiny SD 2.x (v-prediction) diffusers folder (seed 0). Read-only."""
    return _tiny_dir(shared_dir, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(shared_dir: Path) -> Path:
    """A tiny SDXL base diffusers folder (seed 0, 128x128 images). Read-only."""
    return _tiny_sdxl_dir(shared_dir, "tiny_sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_refiner_dir(shared_dir: Path) -> Path:
    """A tiny SDXL refiner diffusers folder (seed 1: weights unlike the base's). Read-only."""
    return _tiny_sdxl_dir(shared_dir, "tiny_sdxl_refiner", refiner=True, seed=1)


@pytest.fixture(scope="session")
def tiny_sdxl_turbo_dir(shared_dir: Path) -> Path:
    """The tiny SDXL base with SDXL-Turbo's scheduler config (trailing timesteps). Read-only."""
    base = _tiny_sdxl_dir(shared_dir, "tiny_sdxl")
    return _once(shared_dir / "tiny_sdxl_turbo", lambda t: _turbo_from_base(base, t))


# v2 bundles use a query chunk of 24 so that the tiny 8x8 latents (64 tokens) really are cut into
# chunks with a partial last one, as 48x48 latents are with the default 512.
TINY_V2_CHUNK = 24


@pytest.fixture(scope="session")
def tiny_bundle(shared_dir: Path, request: pytest.FixtureRequest):
    """Factory: ``tiny_bundle(family="sd1", attention="split-einsum", **options) -> Path``, family
    one of sd1, sd2, sdxl, sdxl-refiner, sdxl-turbo (a compressed or several-size bundle is
    converted over the plain one, reusing its VAE or text encoder; sdxl-turbo over the base,
    reusing every model); each
    distinct request is converted once per session. Read-only: copy before changing anything."""
    from coreml_sd.convert.converter import ConvertOptions, Progress, convert
    from coreml_sd.convert.source import open_source

    def get(family: str = "sd1", attention: str = "split-einsum", **options) -> Path:
        source = request.getfixturevalue(f"tiny_{family.replace('-', '_')}_dir")  # sdxl-refiner, sdxl-turbo
        chunk = TINY_V2_CHUNK if attention == "split-einsum-v2" else 512
        opts = ConvertOptions(attention=attention, query_chunk=chunk, **options)
        label = "-".join([family, attention, *(f"{k}={v}" for k, v in sorted(options.items()))]).replace(",", "+")
        label = "".join(c if c.isalnum() or c in "-=+_" else "_" for c in label)

        def build(target: Path) -> None:
            target.mkdir()
            if family == "sdxl-turbo" or "compress" in options or "sizes" in options:
                # Over a copy of the bundle these models share (the base's; the uncompressed one):
                # its unchanged models are reused, not reconverted, as `convert --overwrite` does.
                base = get("sdxl", attention, **options) if family == "sdxl-turbo" else get(family, attention)
                shutil.copytree(base, target / "bundle")
                opts_ = ConvertOptions(attention=attention, query_chunk=chunk, overwrite=True, **options)
                convert(open_source(str(source)), target / "bundle", opts_, Progress(log=lambda line: None))
                return
            convert(open_source(str(source)), target / "bundle", opts, Progress(log=lambda line: None))

        return _once(shared_dir / "bundles" / label, build) / "bundle"

    return get


@pytest.fixture(scope="session")
def bench_record(tiny_bundle, shared_dir: Path) -> Path:
    """A ``coreml-sd bench`` record of the tiny SD 1.x bundle through the mil backend (3 steps, 2
    runs after 1 warm-up, the Neural Engine asked for), measured once for the whole session:
    tests/benchmarks' bench and report tests read it. Read-only."""
    from click.testing import CliRunner

    from coreml_sd.cli import main

    def build(target: Path) -> None:
        target.mkdir()
        out = target / "results" / "tiny.json"  # a folder bench creates
        result = CliRunner().invoke(main, ["bench", "--bundle", str(tiny_bundle("sd1", "split-einsum")), "--steps", "3",
                                           "--runs", "2", "--warmup", "1", "--backend", "mil",
                                           "--compute-units", "CPU_AND_NE", "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "[mil CPU_ONLY] run 3/3" in result.stderr  # progress while it runs
        # Asked for the Neural Engine, the mil backend measures the CPU: said, not silent.
        assert "note: the mil backend computes on the CPU; measuring CPU_ONLY, not CPU_AND_NE" in result.stderr

    return _once(shared_dir / "bench_record", build) / "results" / "tiny.json"


# ---------------------------------------------------------------------------- several sizes
#
# The one several-size bundle of the suite (`coreml-sd convert --sizes`): the UNet and VAE packages
# multifunction, one function per size ("size_{W}x{H}", the first the default). One bundle for all
# of its tests: each size costs three conversions.


@pytest.fixture(scope="session")
def tiny_sized(tiny_bundle):
    """Factory: ``tiny_sized(height, width) -> Path``, the one-size bundle of the first of
    ``helpers.TINY_SIZES`` (the tiny SD 1.x split-einsum-v2 bundle at its native 64x64). Read-only."""

    def get(height: int, width: int) -> Path:
        assert (height, width) == (64, 64), "one-size bundles at other sizes cost a conversion each: compare with diffusers"
        return tiny_bundle("sd1", "split-einsum-v2")

    return get


@pytest.fixture(scope="session")
def tiny_sizes_bundle(tiny_bundle) -> Path:
    """The tiny SD 1.x bundle (split-einsum-v2) converted with ``--sizes`` of ``helpers.TINY_SIZES``,
    the first the default. Read-only."""
    from helpers import TINY_SIZES

    return tiny_bundle("sd1", "split-einsum-v2", sizes=TINY_SIZES)
