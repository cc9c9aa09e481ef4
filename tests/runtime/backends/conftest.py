"""Fixtures for the backend tests: small purpose-built ML programs saved as packages."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def program_package(tmp_path: Path):
    """Factory: ``program_package(prog, name, target=None) -> Path`` saves a MIL program (built
    with coremltools' ``mb``) as ``tmp_path/<name>.mlpackage``, converted as ``coreml-sd convert``
    converts: an ML program for macOS 13 (or ``target``, a ``ct.target``), float16 compute."""

    def save(prog, name: str, target=None) -> Path:
        import coremltools as ct

        path = tmp_path / f"{name}.mlpackage"
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target or ct.target.macOS13,
                           compute_precision=ct.precision.FLOAT16, skip_model_load=True)
        model.save(str(path))
        return path

    return save
