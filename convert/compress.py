"""Weight compression presets (``convert --compress``): one name, one coremltools pass.

Every preset is a ``coremltools.optimize.coreml`` pass run on the ML program after its weights are
placed and fused (``export.finish``), before it is written: the model is never serialized in
float16 and read back, so compressing costs no second copy of the weights.

| preset                | pass and config                                        | minimum target    |
|-----------------------|--------------------------------------------------------|-------------------|
| palettize-8/6/4       | k-means palette per tensor                             | macOS 13 / iOS 16 |
| palettize-4-grouped   | k-means palette per group of 16 output channels        | macOS 15 / iOS 18 |
| int8                  | linear symmetric int8, a scale per output channel      | macOS 13 / iOS 16 |
| int4-blocked          | linear symmetric int4, a scale per block of 32 inputs  | macOS 15 / iOS 18 |
| mixed-B               | a per-tensor palette of 1, 2, 4, 6 or 8 bits per layer, | macOS 13 / iOS 16 |
|                       | B bits on average (``sensitivity``)                    |                   |

Only weight tensors (two dimensions and more) of more than ``WEIGHT_THRESHOLD`` = 10,000 elements
are compressed; biases and norms stay float16 whatever their size (SDXL's feed-forward biases
have 10,240 elements): they are a few thousandths of the bytes, and an error in a bias shifts
every output of its layer alike. 10,000 is where coremltools starts clustering a float16 tensor
with its optimal 1-D k-means instead of scikit-learn's randomized one, so every per-tensor palette
is optimal and the same on every run; SD 1.5's and SDXL's smallest weight tensors (the first and
last convolutions, 11,520 elements) are above it, so nothing of theirs is left out, while below
it the gain is at most 20 KB per tensor.

k-means is coremltools': float16 tensors of 10,000 weights and more go to the ``kmeans1d`` it ships
(optimal 1-D k-means over the distinct float16 values, fast), the rest (each group of a grouped
palette, float32 weights) to scikit-learn, which coremltools does not require: the convert extra does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..system import import_coremltools

WEIGHT_THRESHOLD = 10_000  # elements; coremltools compresses a constant of more than this many
MIXED_BITS = (1, 2, 4, 6, 8)  # the palette sizes mixed-bit presets choose from, per layer
GROUP_SIZE = 16  # output channels per palette, palettize-4-grouped
BLOCK_SIZE = 32  # input channels per scale, int4-blocked

# Deployment targets by the macOS release, with the iOS release of the same Core ML opset.
TARGETS = {"macOS13": "iOS16", "macOS14": "iOS17", "macOS15": "iOS18"}


class CompressError(ValueError):
    """A preset or target that cannot be used (one-line message naming what would work)."""


@dataclass(frozen=True)
class Preset:
    """A compression preset: its name, nominal bits per compressed weight, the minimum deployment
    target its ops need, and how coremltools is asked for it."""

    name: str
    bits: float
    target: str  # key of TARGETS
    kind: str  # "palettize", "linear" or "mixed"
    granularity: str = "per_tensor"

    @property
    def mixed(self) -> bool:
        return self.kind == "mixed"

    def config(self, nbits: int | None = None):
        """The coremltools op config of the preset (``nbits``: a mixed preset's one layer)."""
        import_coremltools()
        from coremltools.optimize.coreml import OpLinearQuantizerConfig, OpPalettizerConfig

        common = {"weight_threshold": WEIGHT_THRESHOLD}
        if self.kind == "linear":
            if self.granularity == "per_block":
                return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                               block_size=BLOCK_SIZE, **common)
            return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", **common)
        bits = int(self.bits) if nbits is None else nbits
        if self.granularity == "per_grouped_channel":
            return OpPalettizerConfig(mode="kmeans", nbits=bits, granularity="per_grouped_channel", group_size=GROUP_SIZE,
                                      **common)
        return OpPalettizerConfig(mode="kmeans", nbits=bits, granularity="per_tensor", **common)


PRESETS = {
    p.name: p
    for p in (
        Preset("palettize-8", 8, "macOS13", "palettize"),
        Preset("palettize-6", 6, "macOS13", "palettize"),
        Preset("palettize-4", 4, "macOS13", "palettize"),
        Preset("palettize-4-grouped", 4, "macOS15", "palettize", "per_grouped_channel"),
        Preset("int8", 8, "macOS13", "linear", "per_channel"),
        Preset("int4-blocked", 4, "macOS15", "linear", "per_block"),
    )
}
PRESET_NAMES = (*PRESETS, "mixed-B")
_MIXED = re.compile(r"mixed-(\d+(?:\.\d+)?)")


def preset(name: str) -> Preset:
    """The preset called ``name`` (``mixed-B``: B bits on average, 1 <= B <= 8)."""
    if name in PRESETS:
        return PRESETS[name]
    match = _MIXED.fullmatch(name)
    if match is None:
        raise CompressError(f"unknown compression preset {name!r}: choose from {', '.join(PRESET_NAMES)} (e.g. mixed-4.5)")
    bits = float(match.group(1))
    if not MIXED_BITS[0] <= bits <= MIXED_BITS[-1]:
        raise CompressError(f"--compress {name}: a mixed-bit average must be from {MIXED_BITS[0]} to {MIXED_BITS[-1]} bits"
                            " (e.g. mixed-4.5)")
    return Preset(f"mixed-{match.group(1)}", bits, "macOS13", "mixed")


def _version(target: str) -> int:
    return int(target.removeprefix("macOS"))


def parse_target(name: str) -> str:
    """A deployment target named as macOS13..15 or iOS16..18, as the key of ``TARGETS``."""
    for macos, ios in TARGETS.items():
        if name.lower() in (macos.lower(), ios.lower()):
            return macos
    choices = ", ".join(f"{m} ({i})" for m, i in TARGETS.items())
    raise CompressError(f"unknown deployment target {name!r}: choose from {choices}")


def deployment_target(chosen: Preset | None, requested: str | None) -> str:
    """The bundle's minimum deployment target: the one asked for, else the lowest the preset
    needs (macOS 13 without one). An explicit target older than the preset needs is refused."""
    needed = chosen.target if chosen is not None else "macOS13"
    if requested is None:
        return needed
    target = parse_target(requested)
    if _version(target) < _version(needed):
        older = [p for p in PRESETS.values() if _version(p.target) <= _version(target) and p.kind == chosen.kind]
        alternative = f", or a preset for {target} such as {older[-1].name}" if older else ""
        raise CompressError(
            f"--compress {chosen.name} needs {needed} / {TARGETS[needed]} or newer, not --deployment-target {requested}:"
            f" raise or drop --deployment-target{alternative}"
        )
    return target


def describe_target(target: str) -> str:
    return f"{target.replace('macOS', 'macOS ')} / {TARGETS[target].replace('iOS', 'iOS ')}"


def compress_program(program, chosen: Preset, consts: Mapping[str, int | None]) -> None:
    """Compress, in place, the constants of ``program`` named in ``consts`` as ``chosen`` says:
    the model's weights, not the graph's own constants such as a causal mask. A mixed preset's
    ``consts`` give each constant's palette bits."""
    import_coremltools()
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.optimize.coreml import OptimizationConfig

    if chosen.mixed and any(b is None for b in consts.values()):
        raise ValueError(f"{chosen.name}: the bits of each layer are needed")
    # coremltools 9's op configs take no selector: the constants are named one by one instead.
    config = OptimizationConfig(op_name_configs={name: chosen.config(bits) for name, bits in consts.items()})
    graph_pass = PASS_REGISTRY["compression::linear_quantize_weights" if chosen.kind == "linear"
                               else "compression::palettize_weights"]
    graph_pass.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    graph_pass(program)


def weight_bytes(package: Path) -> int:
    """The size of an ML program package's weight file."""
    return (Path(package) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


def program_weight_bytes(program) -> int:
    """The size of the weight file ``program``'s package would have uncompressed: its constants that
    coremltools writes to the file, each after a 64-byte header and padded to 64 bytes, after the
    file's own 64-byte header (coremltools' MIL blob storage format)."""
    import_coremltools()
    import numpy as np
    from coremltools.converters.mil.backend.mil.load import should_use_weight_file

    total = 64
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == "const":
                value = op.outputs[0].val
                if isinstance(value, np.ndarray) and should_use_weight_file(value):
                    total += 64 + -(-value.nbytes // 64) * 64
    return total
