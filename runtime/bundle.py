"""The bundle: the one contract between ``convert`` (writes it) and ``runtime`` (reads it).

A directory holding the Core ML models under the names Apple's Swift ``StableDiffusion``
package loads (``TextEncoder``, ``Unet``, ``VAEDecoder``, ``VAEEncoder`` as ``.mlpackage``, and as
compiled ``.mlmodelc`` on macOS), the tokenizer files ``vocab.json`` and ``merges.txt``, the source
``scheduler_config.json``, and ``manifest.json`` describing all of it with a sha256 per file.

This module holds what both sides share: names, the manifest format and hashing. It imports
neither torch nor coremltools.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VOCAB, MERGES, SCHEDULER_CONFIG = "vocab.json", "merges.txt", "scheduler_config.json"

# CLI component name -> model name in the bundle (Apple's resource names).
COMPONENTS = {
    "text-encoder": "TextEncoder",
    "unet": "Unet",
    "vae-decoder": "VAEDecoder",
    "vae-encoder": "VAEEncoder",
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
            raise BundleError(f"{bundle}: {rel} does not match its sha256 in {MANIFEST} (corrupt or modified); re-run 'coreml-sd convert'")
