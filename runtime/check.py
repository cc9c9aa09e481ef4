"""``coreml-sd check BUNDLE``: the full check of a bundle, for when a result looks wrong.

Opening a bundle for generation trusts a file whose size and modification time match its last
successful check (``bundle.verify_cached``): hashing a 1.6 GB UNet on every run would cost
seconds. A file changed in place with its size and time put back passes that check; this one
hashes every file the manifest lists and names each one that is missing or differs. Then it runs
every model once (the UNet and VAE once per size of a bundle of several), through the backend
generation would use, on probe inputs shaped as the model declares, and names each model whose
outputs are not finite (with the mil backend, also the op where the overflow starts).

The probe catches a model broken for any input (damaged weights, a float16 overflow the
conversion baked in); an overflow that only some prompts or timesteps trigger needs a real
generation to show.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from ..contract import MANIFEST, BundleError, read_manifest, sha256_file
from .backends import BACKENDS

# CLIP's ids (every SD text encoder's vocabulary): "<|startoftext|> a photo of a cat <|endoftext|>",
# padded with the end token as Apple's Swift package pads.
_START, _END = 49406, 49407
_PROBE_PROMPT_IDS = (320, 1125, 539, 320, 2368)
# The first timestep of a 20-step SD schedule: the noisiest input, where float16 headroom is least.
_PROBE_TIMESTEP = 981.0


@dataclass
class Findings:
    """What ``check`` found; the bundle is sound when every list is empty."""

    missing: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)  # model names
    failed: list[str] = field(default_factory=list)  # models that could not be loaded or run
    unopened: str | None = None  # why the models could not be run at all

    def ok(self) -> bool:
        return not (self.missing or self.damaged or self.nonfinite or self.failed or self.unopened)


def manifest_files(root: Path) -> dict[str, str]:
    """The manifest's table of file -> sha256, checked enough to hash from it safely."""
    files = read_manifest(root).get("files")
    if not isinstance(files, dict) or not all(
        isinstance(rel, str) and isinstance(digest, str) and _inside(rel) for rel, digest in files.items()
    ):
        raise BundleError(f"{root}: {MANIFEST} has no valid 'files' table of file -> sha256; "
                          "re-convert the bundle with 'coreml-sd convert'")
    return files


def _inside(rel: str) -> bool:
    return rel != "" and not rel.startswith("/") and ".." not in rel.split("/")


def check_files(root: Path, files: dict[str, str], found: Findings, log) -> None:
    """Hash every listed file (no cache), recording each missing or differing one."""
    log(f"hashing the {len(files)} files {MANIFEST} lists (this reads every byte)")
    for rel, want in files.items():
        path = root / rel
        if not path.is_file():
            found.missing.append(rel)
            log(f"  missing: {rel}")
            continue
        try:
            digest = sha256_file(path)
        except OSError as exc:
            found.damaged.append(rel)
            log(f"  unreadable: {rel} ({exc.strerror or exc})")
            continue
        if digest != want:
            found.damaged.append(rel)
            log(f"  damaged: {rel} (its sha256 differs from the one in {MANIFEST})")


def probe_inputs(inputs: dict) -> dict[str, np.ndarray]:
    """Inputs for one run, built from the model's descriptions (name -> TensorDescription):
    valid token ids for ``input_ids``, the first SD timestep for ``timestep``, image sizes for
    SDXL's ``time_ids``, zeros for other integer inputs, and seeded standard normal values
    (latents' scale) for other float inputs (SDXL's ``text_embeds`` among them)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for name, desc in inputs.items():
        if name == "input_ids":
            row = [_START, *_PROBE_PROMPT_IDS, _END][: desc.shape[-1]]
            row += [_END] * (desc.shape[-1] - len(row))
            value = np.broadcast_to(np.array(row, np.float64), desc.shape)
        elif name == "timestep":
            value = np.full(desc.shape, _PROBE_TIMESTEP)
        elif name == "time_ids":
            value = _probe_time_ids(desc.shape, inputs.get("sample"))
        elif desc.dtype == "int32":
            value = np.zeros(desc.shape)
        else:
            value = rng.standard_normal(desc.shape)
        feeds[name] = np.ascontiguousarray(value).astype(np.int32 if desc.dtype == "int32" else np.float32)
    return feeds


def _probe_time_ids(shape: tuple[int, ...], sample) -> np.ndarray:
    """SDXL's micro-conditioning as a generation feeds it, at the image size the UNet's latents
    imply: original size, crop (0, 0), then the target size (the base's 6 ids) or the refiner's
    default aesthetic score (its 5), tiled over the batch (or the flat (12,) of early conversions)."""
    h, w = (sample.shape[-2] * 8, sample.shape[-1] * 8) if sample is not None and len(sample.shape) == 4 else (1024, 1024)
    row = [h, w, 0, 0, *((6.0,) if shape[-1] == 5 else (h, w))]
    return np.resize(np.array(row, np.float64), shape)


def run_models(bundle, backend: str, skip: set[str], found: Findings, log) -> list[str]:
    """Run each model of ``bundle`` once on probe inputs (except those in ``skip``), recording
    the ones with non-finite outputs and the ones that fail; the names of the models run. The
    UNet and VAE of a bundle of several sizes run once per size (named "Unet size_512x768"):
    each size is its own function, which a damaged weight or an overflow may break alone."""
    ran = []
    for name, files in bundle.models.items():
        paths = (files.compiled or files.packages) if backend == "coreml" else files.packages
        if not paths:
            continue
        if name in skip:
            log(f"{name}: not run, its files are damaged or missing")
            continue
        functions = list(dict.fromkeys(bundle.at(*size).function_of(name) for size in bundle.sizes))
        for function in functions:
            label = name if function is None else f"{name} {function}"
            if _run_model(label, paths, backend, function, found, log):
                ran.append(label)
    return ran


def _run_model(label: str, paths: list[Path], backend: str, function: str | None, found: Findings, log) -> bool:
    """Run one model (its ``function``) once; False when it could not be loaded or run."""
    from .backends import BackendError, ChainedModel, load_model

    log(f"{label}: running once on probe inputs ({backend} backend)")
    try:
        chunks = [load_model(p, backend, function=function) for p in paths]
        model = chunks[0] if len(chunks) == 1 else ChainedModel(chunks)
        feeds = probe_inputs(model.inputs)
        outputs = model.predict(feeds)
    except BackendError as exc:
        found.failed.append(label)
        log(f"  failed: {exc}")
        return False
    bad = [out for out, value in outputs.items() if not np.isfinite(value).all()]
    if not bad:
        log("  outputs finite")
        return True
    found.nonfinite.append(label)
    where = ""
    if len(chunks) == 1 and hasattr(model, "find_nonfinite"):  # mil: name the op
        first = model.find_nonfinite(feeds)
        if first is not None:
            where = f"; the first op to produce inf/NaN is {first[0]} {first[1]}"
    log(f"  not finite: output {', '.join(bad)} holds inf or NaN{where}")
    return True


def _summary(found: Findings, hashed: int | None, ran: list[str], backend: str | None) -> str:
    if found.ok():
        parts = [f"{hashed} files match {MANIFEST}" if hashed is not None else "no hashes to check"]
        if backend is not None:
            parts.append(f"{len(ran)} models ran with finite outputs ({backend} backend)")
        return "bundle OK: " + "; ".join(parts)
    problems = [f"{len(items)} {what}" for items, what in (
        (found.damaged, "damaged file(s)"), (found.missing, "missing file(s)"),
        (found.nonfinite, "model(s) with non-finite outputs"), (found.failed, "model(s) that failed to run"),
    ) if items]
    if found.unopened:
        problems.append("models not run (the bundle cannot be opened)")
    return f"bundle NOT OK: {', '.join(problems)}; re-convert it with 'coreml-sd convert' (or download it again)"


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: coreml on macOS, mil elsewhere.")
@click.option("--no-run", is_flag=True, help="Check the hashes only; do not run the models.")
def check(bundle, backend, no_run):
    """Fully check BUNDLE: re-hash every file its manifest lists, then run each model once.

    Exits 0 when every file matches and every output is finite, 1 otherwise.
    """
    from .backends import BackendError, default_backend, require
    from .bundle import open_bundle

    def log(line: str) -> None:
        click.echo(line, err=True)

    root = bundle.expanduser()
    if not root.is_dir():
        raise click.ClickException(f"{root}: no such bundle directory; give the folder 'coreml-sd convert' wrote")
    backend = default_backend() if backend == "auto" else backend
    if not no_run:
        try:
            require(backend)  # before the hashing: a wrong backend costs no time
        except BackendError as exc:
            raise click.ClickException(str(exc)) from None
    found, hashed = Findings(), None
    if (root / MANIFEST).exists():
        try:
            files = manifest_files(root)
        except BundleError as exc:  # nothing to check the files against
            raise click.ClickException(str(exc)) from None
        check_files(root, files, found, log)
        hashed = len(files)
    elif no_run:
        raise click.ClickException(f"{root}: no {MANIFEST}, so there are no hashes to check; "
                                   "drop --no-run to run its models")
    ran = []
    if not no_run:
        try:
            opened = open_bundle(root, verify=False)
        except BundleError as exc:
            if found.ok():  # nothing else to report: the one line says it all
                raise click.ClickException(str(exc)) from None
            found.unopened = str(exc)
            log(f"cannot run the models: {exc}")
        else:
            if hashed is None:
                log(f"{opened.layout} layout: no {MANIFEST}, so there are no hashes to check; running its models only")
            # A model with a damaged or missing file is not run: the hashes already condemn it.
            broken = {rel.split("/", 1)[0] for rel in found.missing + found.damaged}
            skip = {name for name, f in opened.models.items()
                    if any(p.relative_to(opened.path).parts[0] in broken for p in f.packages + f.compiled)}
            ran = run_models(opened, backend, skip, found, log)
    click.echo(_summary(found, hashed, ran, None if no_run else backend))
    sys.exit(0 if found.ok() else 1)
