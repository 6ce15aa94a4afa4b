"""bfloat16 that is right on every CPU: a self-check of the convolutions a model uses.

On some CPUs oneDNN computes some bfloat16 convolutions wrongly. Seen on a 2-core Intel Xeon
VM with AMX (torch 2.13, 2026-11): a conv with fewer than 32 channels whose stride equals its
kernel (4×4 or 8×8, as SegFormer's patch embedding and spatial reduction) returns a relative
error of about 1.0 instead of 0.002; the same call is right on an AMD EPYC VM with AVX512-BF16,
and with 32 channels or more on both. Which shapes are hit depends on the CPU and the oneDNN
build, so nothing here is a list of shapes: `bf16_is_wrong` runs each geometry once, in bfloat16
and in float32 on the same (bfloat16-rounded) numbers, and calls it wrong when they disagree
far beyond bfloat16's rounding. `guard_bf16` then makes the convolutions it finds run in
float32, says so once, and leaves every other layer in bfloat16.

bfloat16 that pays: a layer is not always faster in bfloat16. Where the CPU has no bfloat16
units (no AVX512-BF16, no AMX) oneDNN emulates it, and even with them some kernels are slower
(torch 2.13's CPU attention for SegFormer's head size 32, on an AMD EPYC with AVX512-BF16).
`probe_ms` times one op at its real shape once per process, in bfloat16, in float32 (the
casts to and from float32 included) and, for attention, as bfloat16 matmuls, and `fastest`
picks the way to run it; nothing here is a constant tuned on one CPU. `segcompare.infer.fast`
asks it for each layer of a bfloat16 SegFormer.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcompare.utils import cpu_flags

log = logging.getLogger(__name__)

# bfloat16 rounds the output and accumulates in float32: the relative error of a right conv on
# bfloat16 inputs is about 0.002 (8 bits of mantissa); the wrong ones are near 1.
WRONG_RELATIVE_ERROR = 0.05

# (weight shape, stride, padding, dilation, groups, channels_last, device type) -> wrong?
_VERDICTS: dict[tuple, bool] = {}


def bf16_is_wrong(conv: nn.Conv2d, channels_last: bool = False) -> bool:
    """Whether a bfloat16 conv of `conv`'s geometry computes wrongly here."""
    return bf16_conv_is_wrong(
        tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups,
        channels_last, conv.weight.device,
    )  # fmt: skip


def bf16_conv_is_wrong(
    weight_shape: Sequence[int], stride: Sequence[int], padding: Any, dilation: Sequence[int],
    groups: int, channels_last: bool = False, device: Any = "cpu",
) -> bool:  # fmt: skip
    """Whether a bfloat16 conv2d of this geometry computes wrongly here; checked once per
    geometry and process, on a 4×6 output grid of random numbers."""
    device = torch.device(device)
    padding = tuple(padding) if isinstance(padding, (tuple, list)) else padding
    key = (tuple(weight_shape), tuple(stride), padding, tuple(dilation), groups, channels_last,
           device.type)  # fmt: skip
    if key not in _VERDICTS:
        error = _probe(*key[:6], device)
        _VERDICTS[key] = error > WRONG_RELATIVE_ERROR
        if _VERDICTS[key]:
            log.debug("bf16 conv %s: relative error %.3f", key, error)
    return _VERDICTS[key]


def _probe(
    weight_shape: tuple, stride: tuple, padding: Any, dilation: tuple, groups: int,
    channels_last: bool, device: torch.device,
) -> float:  # fmt: skip
    """Relative error of a bfloat16 conv against float32 on the same bfloat16-rounded numbers."""
    g = torch.Generator().manual_seed(0)
    out_channels, in_per_group, kh, kw = weight_shape
    (sh, sw), (dh, dw) = stride, dilation
    # enough input for a 4×6 output grid whatever the padding
    h, w = dh * (kh - 1) + 1 + 3 * sh, dw * (kw - 1) + 1 + 5 * sw
    x = torch.randn(1, in_per_group * groups, h, w, generator=g).bfloat16().to(device)
    weight = torch.randn(weight_shape, generator=g).bfloat16().to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    args = (stride, padding, dilation, groups)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        ref = F.conv2d(x.float(), weight.float(), None, *args)
        out = F.conv2d(x, weight, None, *args).float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bfloat16 in hardware. On x86: AVX512-BF16 or AMX. Without them
    oneDNN emulates bfloat16 in float32 with conversions around every kernel, and a bf16-autocast
    training step of the demo's models took 1.9-2.0x as long as float32 on an Intel Xeon with
    AVX-512 and 6-14x as long on an AMD EPYC with AVX2 only (benchmarks/RESULTS.md, "A CPU with
    AVX2 only"). Other architectures: True (not measured here: the choice is left to the user's
    setting)."""
    return _x86_cpu_has({"avx512_bf16", "amx_bf16"})


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8).
    Without them oneDNN's int8 convolutions multiply with vpmaddubsw and gain nothing over
    float32 (an AMD EPYC with AVX2 only: 1.05x of fp32's time), so `--precision int8` is not
    offered there (`segcompare.infer.quantize`). Other architectures: True (not x86 kernels)."""
    return _x86_cpu_has({"avx512_vnni", "avx_vnni", "amx_int8"})


def _x86_cpu_has(features: set[str]) -> bool:
    """Whether an x86 CPU has any of `features` (names as /proc/cpuinfo and torch's
    `torch.cpu.get_capabilities` both spell them: torch's own reading of the CPU, /proc/cpuinfo
    with an older torch); True on other architectures."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return True
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    found = {k for k, v in capabilities().items() if v is True} if capabilities else cpu_flags()
    return bool(found & features)


class Float32Conv2d(nn.Conv2d):
    """A Conv2d that always computes in float32 (also under autocast) and returns its input's
    dtype: what `guard_bf16` turns a conv into when bfloat16 is wrong for it on this CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = self._conv_forward(x.float(), self.weight.float(), self.bias_float())
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

    def bias_float(self) -> Optional[torch.Tensor]:
        return None if self.bias is None else self.bias.float()


def guard_bf16(model: nn.Module, what: str = "") -> list[str]:
    """Make every conv of `model` that bfloat16 computes wrongly on this CPU run in float32 (in
    place: the class of those modules becomes `Float32Conv2d`; names, parameters and state dict
    are unchanged). Logs the layers once; returns their names. Call it before running the model
    in bfloat16 (autocast or a bfloat16 copy) on a CPU; on other devices it changes nothing."""
    wrong = []
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and module.weight.device.type == "cpu":
            if bf16_is_wrong(module):
                module.__class__ = Float32Conv2d
                wrong.append(name)
    report_float32(wrong, what)
    return wrong


def report_float32(names: Sequence[str], what: str = "") -> None:
    """The one warning that layers `names` of `what` run in float32 (none when there are none)."""
    if names:
        log.warning(
            "bf16 self-check%s: oneDNN computes %d conv layer(s) wrongly in bfloat16 on this CPU; "
            "they run in float32 (%s)", f" of {what}" if what else "", len(names),
            ", ".join(names[:4]) + (", ..." if len(names) > 4 else ""),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The timing probe

# op key (what it is and its input shapes) -> {way: fastest ms}, once per process
_TIMINGS: dict[tuple, dict[str, float]] = {}
# Runs of each way, alternated; the fastest counts (the first, which also creates oneDNN's
# kernels and faults the memory in, can only lose). At least PROBE_RUNS, and more (up to
# PROBE_MAX_RUNS) until PROBE_MS have passed, so that a small op is timed often enough for a
# busy machine's pauses to miss one of its runs.
PROBE_RUNS, PROBE_MAX_RUNS, PROBE_MS = 2, 25, 30.0


def probe_ms(key: tuple, ways: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """{way: ms} of the op `key` names (its kind and real input shapes), each way of computing
    it ('fp32' with the casts, 'bf16', ...) timed once per key and process."""
    if key not in _TIMINGS:
        _TIMINGS[key] = time_each(ways)
        log.debug("bf16 probe %s: %s", key, _TIMINGS[key])
    return _TIMINGS[key]


def fastest(ms: dict[str, float]) -> str:
    """The rule: the way that ran fastest; at equal times the first listed ('fp32' comes
    first: the more accurate)."""
    return min(ms, key=ms.__getitem__)


def time_each(ways: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """{way: the fastest of its runs, in ms}, the ways alternated so that a slow moment of a
    shared machine hurts them alike."""
    best = dict.fromkeys(ways, float("inf"))
    with torch.inference_mode():
        start, rounds = time.perf_counter(), 0
        while rounds < PROBE_RUNS or (
            rounds < PROBE_MAX_RUNS and 1000 * (time.perf_counter() - start) < PROBE_MS
        ):  # fmt: skip
            for way, run in ways.items():
                t0 = time.perf_counter()
                run()
                best[way] = min(best[way], 1000 * (time.perf_counter() - t0))
            rounds += 1
    return best
