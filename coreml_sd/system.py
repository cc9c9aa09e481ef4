"""What both stages and the benchmarks ask of the system: coremltools imported quietly, the
versions of the tools in use, and this process's peak memory.

coremltools is imported through ``import_coremltools()``, never directly: off macOS its import
logs lines about the missing Core ML binding, which are noise there.
"""

from __future__ import annotations

import logging
import platform
import re
import resource
import sys
from importlib.metadata import PackageNotFoundError, version

# How to get torch and the rest of the conversion stack (the mil backend needs torch too).
INSTALL_CONVERT_EXTRA = "pip install 'coreml-sd[convert]'"

# What coremltools logs while it imports where it is expected, one pattern per line it prints:
# off macOS its Core ML binding (libcoremlpython) does not exist, and the torch this project pins
# is newer than the ones coremltools was tested with (conversion works, see DESIGN), and so is
# the scikit-learn that k-means palettization uses (coremltools' converter *from* scikit-learn
# models, which we never use, is what it disables).
_IMPORT_NOISE = re.compile(
    r"Failed to load _ML\w+Proxy: No module named 'coremltools\.libcoremlpython'"
    r"|Torch version \S+ has not been tested with coremltools\. .*"
    r"|scikit-learn version \S+ is not supported\. .*Disabling scikit-learn conversion API\."
)

# The distributions whose versions a bundle or a benchmark record names.
TOOLS = ("coreml-sd", "coremltools", "torch", "diffusers", "transformers", "numpy")


def _not_import_noise(record: logging.LogRecord) -> bool:
    return _IMPORT_NOISE.fullmatch(record.getMessage()) is None


def import_coremltools():
    """The ``coremltools`` module, imported without the lines it logs where they are expected (see
    ``_IMPORT_NOISE``); any other message, warning or error still shows. Submodules imported
    afterwards import quietly."""
    if "coremltools" in sys.modules:
        import coremltools

        return coremltools
    # coremltools logs these through its package logger (no handler of its own: Python's
    # last-resort handler prints them to stderr); a filter on that logger drops exactly them.
    logger = logging.getLogger("coremltools")
    logger.addFilter(_not_import_noise)
    try:
        import coremltools
    finally:
        logger.removeFilter(_not_import_noise)
    return coremltools


def tool_versions(names: tuple[str, ...] = TOOLS) -> dict[str, str | None]:
    """Installed versions of ``names`` (None where one is not installed) and of Python, read from
    package metadata: importing coremltools or torch only to ask would cost seconds."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {**versions, "python": platform.python_version()}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
