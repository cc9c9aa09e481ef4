"""What the libraries print during a conversion: nothing, unless the user asks (``--verbose``).

Our ``Progress`` lines already say which component and stage is running and for how long. On top
of them coremltools draws four tqdm bars per component and logs two warnings that every conversion
of these models triggers, and transformers draws a bar while it loads weights: noise that buries
our lines. Everything is put back as it was when the block ends.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from ..system import import_coremltools

# Where coremltools 9.0 (pinned) makes its bars on the ML program path: the torch frontend's op
# loop and the MIL pass pipelines. It has no option to turn them off, and tqdm reads TQDM_DISABLE
# only when it is first imported (by torch's and transformers' imports, long before ours).
_COREMLTOOLS_BARS = (
    ("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),
    ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
)
# The compression passes' bar (--compress): a stage of minutes on a full-size UNet, so it becomes
# a line of ours now and then instead (``_every``).
_COMPRESSION_BAR = ("coremltools.optimize.coreml._quantization_passes", "tqdm")
PROGRESS_SECONDS = 30

# What coremltools logs on every conversion of our modules, expected and harmless: the text
# encoder's two outputs are a tuple, and int64 constants (token ids, shapes) are stored as int32,
# which holds them exactly.
_EXPECTED = re.compile(
    r"Tuple detected at graph output\. This will be flattened in the converted model\."
    r"|Saving value type of int64 into a builtin type of int32, might lose precision!"
)


class _Forward(logging.Handler):
    """coremltools' warnings, minus the expected ones, as our own lines."""

    def __init__(self, log: Callable[[str], None]):
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not _EXPECTED.fullmatch(message):
            self.log(f"warning from coremltools: {message}")


def _every(iterable, *_, log: Callable[[str], None], desc: str = "", **__) -> Iterator:
    """``iterable``, with a line through ``log`` every ``PROGRESS_SECONDS`` while it is walked."""
    items = list(iterable)
    shown = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        if time.perf_counter() - shown > PROGRESS_SECONDS and done < len(items):
            log(f"  compressing: {done} of {len(items)} large constants done")
            shown = time.perf_counter()


@contextmanager
def library_output(verbose: bool, log: Callable[[str], None]) -> Iterator[None]:
    """Within the block, no progress bars from coremltools, transformers or diffusers, and of
    coremltools' warnings only the unexpected ones, through ``log``; with ``verbose``, all of it."""
    if verbose:
        yield
        return
    import diffusers.utils.logging
    import transformers.utils.logging
    from tqdm import tqdm

    import_coremltools()  # its import noise filtered, before its submodules are imported below
    with ExitStack() as restore:
        quiet_bar = functools.partial(tqdm, disable=True)
        for module_name, attr in _COREMLTOOLS_BARS:
            module = importlib.import_module(module_name)
            restore.callback(setattr, module, attr, getattr(module, attr))
            setattr(module, attr, quiet_bar)

        module = importlib.import_module(_COMPRESSION_BAR[0])
        restore.callback(setattr, module, _COMPRESSION_BAR[1], getattr(module, _COMPRESSION_BAR[1]))
        setattr(module, _COMPRESSION_BAR[1], functools.partial(_every, log=log))

        logger = logging.getLogger("coremltools")
        handler = _Forward(log)
        logger.addHandler(handler)
        restore.callback(logger.removeHandler, handler)
        restore.callback(setattr, logger, "propagate", logger.propagate)
        logger.propagate = False

        for library in (transformers.utils.logging, diffusers.utils.logging):
            if library.is_progress_bar_enabled():
                library.disable_progress_bar()
                restore.callback(library.enable_progress_bar)
        yield
