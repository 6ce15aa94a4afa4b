"""What `--precision` means on each device: the one table (cheap to import: no torch).

    precision_for("bf16", "cpu").dtype   # 'bfloat16'
    amp_precision("cuda")                # 'fp16': what --amp (the alias) means there

`PRECISIONS` is the list of choices every inference command offers (`predict`, `eval`,
`compare`, `video`, `bench`), in the order they are shown; a new precision is a row of `TABLE`
and its name appended to `PRECISIONS`. `InferenceSettings.precision` holds one of them.
`--amp`, the older flag, stays an alias: bfloat16 on the CPU, float16 on a GPU (CUDA, MPS).

Which layers of a bfloat16 model really compute in bfloat16 is decided on the machine that runs
it (`segcompare.models.precision`: a self-check of correctness, and a timing probe for SegFormer).
"""

from __future__ import annotations

from dataclasses import dataclass

from segcompare.utils import SegcompareError

PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # --precision's choices


@dataclass(frozen=True)
class Precision:
    """One row of `TABLE`.

    name: the option's value. dtype: the torch dtype the model's weights and maps take (a name
    of `torch`: 'float32', 'bfloat16', 'float16'). devices: the device types it runs on (torch
    has float32, bfloat16 and float16 kernels on the CPU, CUDA and MPS; bfloat16 on CUDA needs
    compute capability 8.0, checked where the device is known). label: how reports say it.
    """

    name: str
    dtype: str
    devices: tuple[str, ...]
    label: str

    @property
    def reduced(self) -> bool:
        """Whether the model runs below float32 (compare scores it in fp32 too)."""
        return self.name != "fp32"

    @property
    def quantized(self) -> bool:
        """int8: a quantized graph (`segcompare.infer.quantize`), not autocast."""
        return self.name == "int8"


TABLE = {
    "fp32": Precision("fp32", "float32", ("cpu", "cuda", "mps"), "float32"),
    "bf16": Precision("bf16", "bfloat16", ("cpu", "cuda", "mps"), "bfloat16"),
    "fp16": Precision("fp16", "float16", ("cpu", "cuda", "mps"), "float16"),
    # int8 convolutions, float32 maps in and out (segcompare.infer.quantize): HRNet on the CPU
    "int8": Precision("int8", "float32", ("cpu",), "int8"),
}

# --amp: mixed precision in the 16-bit type each device computes fastest (the CPU's oneDNN has
# bfloat16 kernels, AVX512-BF16 and AMX; GPUs have float16 tensor cores everywhere).
AMP = {"cpu": "bf16"}
AMP_GPU = "fp16"


def amp_precision(device_type: str) -> str:
    """The precision `--amp` stands for on a device type ('cpu', 'cuda', 'mps')."""
    return AMP.get(device_type, AMP_GPU)


def check_precision(name: str, what: str = "--precision") -> str:
    """`name` if it is a precision; else one SegcompareError naming the choices."""
    if name not in TABLE:
        raise SegcompareError(f"{what} {name!r}: valid: {', '.join(PRECISIONS)}")
    return name


def precision_for(name: str, device_type: str) -> Precision:
    """The row of `name` for a device type; SegcompareError where it does not run."""
    row = TABLE[check_precision(name)]
    if device_type not in row.devices:
        raise SegcompareError(
            f"--precision {name} does not run on {device_type}; there: "
            + ", ".join(p for p in PRECISIONS if device_type in TABLE[p].devices)
        )
    return row


def recorded_precision(settings: dict) -> str:
    """The precision a recorded settings dict (eval's and compare's JSON) names: its
    'precision', or for files written before it existed, 'amp' (True: the alias; the device
    is unknown there, so 'amp')."""
    if "precision" in settings:
        return str(settings["precision"])
    return "amp" if settings.get("amp") else "fp32"
