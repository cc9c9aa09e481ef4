"""Writing a bundle atomically, and reusing components that are already converted.

Everything is built in a staging directory beside the target (``.NAME.partial``) and renamed
into place at the end, so the target is never a half bundle. Each finished component is recorded
in the staging directory with its *recipe* hash (source fingerprint, settings, tool versions) and
its file hashes; a re-run after an interruption keeps those, and a conversion over an existing
bundle (``--overwrite``) hard-links the components whose recipe and files still match instead of
converting them again. Whatever else the staging directory holds when a run opens it (a package
saved or compiled by a run that stopped before recording it, a temporary file) is removed: only
recorded components survive an interruption.

One run at a time writes a bundle: a second conversion of the same target is refused while a lock
file beside the staging folder (``.NAME.lock``) is held, since it would sweep the first run's files.
Temporary files (coremltools writes a whole package before the bundle's copy) are kept inside the
staging folder, so even a killed run leaves them where the next run's sweep removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..contract import FORMAT_VERSION, MANIFEST, BundleError, hash_tree, read_manifest

_PROGRESS = ".components.json"  # staging-only record of finished components
_SCRATCH = ".tmp"  # staging-only folder for temporary files, see BundleWriter.temporaries


class OutputError(Exception):
    """The output path cannot be written as asked (one-line message)."""


def staging_dir(out: Path) -> Path:
    """Where the bundle for ``out`` is built: a hidden sibling, renamed to ``out`` at the end."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.partial"


def lock_path(out: Path) -> Path:
    """The lock file a conversion into ``out`` holds: beside the staging folder, never inside it
    (the staging folder becomes the bundle)."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.lock"


def _follow_umask(root: Path) -> None:
    """Give every file and folder under ``root`` the mode the user's umask gives new ones (0644 and
    0755 under umask 022): coremltools writes a package's files through mkstemp and mkdtemp, which
    make them private (0600, 0700), so another account could not read a shared bundle."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _files_match(root: Path, files: dict[str, str]) -> bool:
    try:
        return all(hash_tree(root, rel) == {rel: sha} for rel, sha in files.items())
    except OSError:
        return False


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link a file or package (never modified in place), copying where links fail."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        link(str(src), str(dst))


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_output(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """Refuse an output path that cannot take a bundle (one-line ``OutputError``); returns the
    manifest of the bundle already there (None when there is none), for reusing its components."""
    out = Path(out).absolute()
    if not out.exists():
        return None
    if not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it")
    if not out.is_dir():
        raise OutputError(f"output {out} is a file; choose a folder path for the bundle")
    if not any(out.iterdir()):
        return None
    try:
        return read_manifest(out)
    except BundleError:
        raise OutputError(
            f"output {out} exists and is not a coreml-sd bundle; refusing to replace it (choose another output folder)"
        ) from None


def _take_lock(out: Path):
    """The lock on converting into ``out``, or a one-line ``OutputError`` naming the run that holds
    it. A second run is refused, not queued, as git refuses while ``index.lock`` exists: it was most
    likely started by mistake, and after waiting it would only find the bundle there. The lock is
    the kernel's (flock), so a killed run never leaves it held."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path(out)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputError(
            f"another conversion is writing {out} (it holds {lock_path(out)}); wait for it to finish or choose another output"
        ) from None
    return lock


class BundleWriter:
    """The staging folder of a bundle converting the components ``names``, ready on construction.

    Construction creates the staging folder or resumes it. Recorded components this run does
    not ask for are forgotten (left by an earlier request), and everything no remaining recorded
    component owns is deleted. A run can stop between saving a component and recording it
    (Ctrl-C while its files are hashed, a failed compile): its package is then on disk but
    unknown, and would both block the next save of that component and slip into the bundle
    unlisted if the next run did not ask for it. Files written for the whole bundle (tokenizer,
    scheduler) are rewritten anyway.

    Construction takes the bundle's lock (``OutputError`` if another run holds it) and so comes
    before any change to the staging folder; use the writer as a context manager, which releases it.
    """

    def __init__(self, out: Path, overwrite: bool, names: set[str]):
        self.out = Path(out).absolute()
        self.staging = staging_dir(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _take_lock(self.out)
        try:
            self._open(overwrite, names)
        except BaseException:
            self.close()
            raise

    def _open(self, overwrite: bool, names: set[str]) -> None:
        self.previous = check_output(self.out, overwrite)  # under the lock: no other run changes it now
        self.staging.mkdir(exist_ok=True)
        self.done: dict[str, dict[str, Any]] = {}
        record = self.staging / _PROGRESS
        if record.exists():
            try:
                self.done = json.loads(record.read_text())
            except ValueError:
                self.done = {}
        if set(self.done) - names:
            self.done = {name: entry for name, entry in self.done.items() if name in names}
            self._save()
        owned = {top for entry in self.done.values() for top in entry.get("paths", [])}
        for path in self.staging.iterdir():
            if path.name != _PROGRESS and path.name not in owned:
                _remove(path)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release the bundle's lock and remove its file, so that no run leaves a ``.NAME.lock``
        beside the bundle. The file goes while the lock is still held: a run that opened it just
        before finds it unlinked once it gets the lock (filelock checks) and starts again."""
        if self._lock.is_locked:
            Path(self._lock.lock_file).unlink(missing_ok=True)
            self._lock.release()

    @contextmanager
    def temporaries(self) -> Iterator[Path]:
        """Python's temporary files and folders go to a folder inside the staging folder for the
        duration (tempfile's default and TMPDIR), which is then removed. coremltools converts into
        a temporary package and deletes it only at interpreter exit: gigabytes in the system's
        temporary folder for ever if the run is killed, where inside staging the next run sweeps it."""
        scratch = self.staging / _SCRATCH
        scratch.mkdir(exist_ok=True)
        saved = tempfile.tempdir, os.environ.get("TMPDIR")
        tempfile.tempdir = os.environ["TMPDIR"] = str(scratch)
        try:
            yield scratch
        finally:
            tempfile.tempdir = saved[0]
            if saved[1] is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved[1]
            _remove(scratch)

    # ------------------------------------------------------------------ components

    def reuse(self, name: str, recipe: str) -> str | None:
        """Keep an already converted component if its recipe and files match: returns where it
        came from ("interrupted run" or "existing bundle"), or None when it must be converted."""
        entry = self.done.get(name)
        if isinstance(entry, dict) and entry.get("recipe") == recipe and _files_match(self.staging, entry.get("files") or {}):
            return "interrupted run"
        self._drop(name)
        old = self._previous_entry(name, recipe)
        if old is not None:
            entry, paths, files = old
            if files and _files_match(self.out, files):
                for top in paths:
                    _link_tree(self.out / top, self.staging / top)
                self.record(name, {k: v for k, v in entry.items() if k != "recipe"}, recipe, paths)
                return "existing bundle"
        return None

    def _previous_entry(self, name: str, recipe: str) -> tuple[dict[str, Any], list[str], dict[str, str]] | None:
        """The existing bundle's manifest entry for ``name`` with its top-level paths and file
        hashes, when made by the same recipe; None when absent, different, or damaged (the
        component is then converted again)."""
        try:
            entry = self.previous["components"][name]
            if entry["recipe"] != recipe:
                return None
            paths = [str(top) for top in entry["paths"]]
            files = {str(rel): str(sha) for rel, sha in self.previous["files"].items() if str(rel).split("/")[0] in paths}
        except (TypeError, KeyError, AttributeError):
            return None
        return entry, paths, files

    def _drop(self, name: str) -> None:
        entry = self.done.pop(name, None)
        for top in (entry or {}).get("paths", []):
            _remove(self.staging / top)
        self._save()

    def record(self, name: str, entry: dict[str, Any], recipe: str, paths: list[str]) -> None:
        """Mark a component finished: its manifest entry plus the hashes of its files."""
        files: dict[str, str] = {}
        for top in paths:
            files.update(hash_tree(self.staging, top))
        self.done[name] = {**entry, "recipe": recipe, "paths": paths, "files": files}
        self._save()

    def _save(self) -> None:
        tmp = self.staging / (_PROGRESS + ".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        tmp.replace(self.staging / _PROGRESS)

    # ------------------------------------------------------------------ finish

    def write_text(self, rel: str, text: str) -> None:
        (self.staging / rel).write_text(text)

    def finish(self, manifest: dict[str, Any], extra_files: list[str]) -> Path:
        """Write manifest.json (with every file's sha256) and move the bundle into place."""
        files: dict[str, str] = {}
        components = {}
        for name, entry in sorted(self.done.items()):
            files.update(entry["files"])
            components[name] = {k: v for k, v in entry.items() if k != "files"}
        for rel in extra_files:
            files.update(hash_tree(self.staging, rel))
        manifest = {"format_version": FORMAT_VERSION, **manifest, "components": components, "files": dict(sorted(files.items()))}
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (self.staging / _PROGRESS).unlink()
        _follow_umask(self.staging)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
        self.staging.rename(self.out)
        if old is not None:
            shutil.rmtree(old)
        return self.out
