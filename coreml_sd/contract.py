"""The bundle: the one contract between ``convert`` (writes it) and ``runtime`` (reads it).

A directory holding the Core ML models under the names Apple's Swift ``StableDiffusion`` package
loads (``TextEncoder``, ``Unet``, ``VAEDecoder``, ``VAEEncoder`` as ``.mlpackage``, and as compiled
``.mlmodelc`` on macOS, the form the Swift package reads: apple/ml-stable-diffusion at e12202c,
``swift/StableDiffusion/pipeline/StableDiffusionPipeline+Resources.swift`` lines 29-37), the
tokenizer files ``vocab.json`` and ``merges.txt``, the source ``scheduler_config.json``, and
``manifest.json`` describing all of it with a sha256 per file.
Which models a bundle holds, and their inputs and outputs, are the family's (``families.py``).

Both stages import this module; it imports neither torch nor coremltools.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB, MERGES, SCHEDULER_CONFIG = "vocab.json", "merges.txt", "scheduler_config.json"

# Apple's Python converter names packages "Stable_Diffusion_version_<model>_<submodule>.mlpackage"
# (its published packages/ folders); the compiled Resources folders use the bare model names
# (apple/ml-stable-diffusion at e12202c, python_coreml_stable_diffusion/torch2coreml.py lines
# 99-102 and 281-291: SDXL's second encoder is "text_encoder_2", a refiner converted beside a base
# "refiner", compiled as TextEncoder2 and UnetRefiner).
APPLE_PACKAGE_PREFIX = "Stable_Diffusion_version_"
APPLE_SUBMODULES = {
    "TextEncoder": "text_encoder",
    "TextEncoder2": "text_encoder_2",
    "Unet": "unet",
    "UnetRefiner": "refiner",
    "VAEDecoder": "vae_decoder",
    "VAEEncoder": "vae_encoder",
}

# The noise schedule every SD 1.x / 2.x checkpoint was trained with, as SD 1.5's
# scheduler_config.json spells it (PNDM): what a bundle without a scheduler config gets (Apple's
# Swift package hard-codes the same values), and what tests and benchmarks start from.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,  # SD configs say so; DDIM's own default would clip x0 to [-1, 1]
}


class BundleError(Exception):
    """A bundle that cannot be used; the message is one line naming the problem and the fix."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path, rel: str) -> dict[str, str]:
    """sha256 of ``root/rel`` (a file) or of every file under it (a package directory), keyed by
    POSIX path relative to ``root``."""
    path = root / rel
    if path.is_file():
        return {rel: sha256_file(path)}
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def read_manifest(bundle: Path) -> dict[str, Any]:
    """The parsed manifest of a coreml-sd bundle, with its format version checked."""
    path = Path(bundle) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle}: no {MANIFEST}; is this a bundle written by 'coreml-sd convert'?") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc}); re-run 'coreml-sd convert'") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{bundle}: bundle format version {version!r}, this coreml-sd reads version {FORMAT_VERSION}; "
            "re-convert it with this version of 'coreml-sd convert'"
        )
    return manifest


def verify_files(bundle: Path, files: dict[str, str], prefix: str = "") -> None:
    """Check the sha256 of every manifest file (under ``prefix``, if given) against the disk."""
    bundle = Path(bundle)
    for rel, want in files.items():
        if not rel.startswith(prefix):
            continue
        path = bundle / rel
        if not path.is_file():
            raise BundleError(f"{bundle}: missing file {rel}; the bundle is incomplete, re-run 'coreml-sd convert'")
        if sha256_file(path) != want:
            raise BundleError(
                f"{bundle}: {rel} does not match its sha256 in {MANIFEST} (corrupt or modified); re-run 'coreml-sd convert'"
            )
