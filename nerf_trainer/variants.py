"""The IP2P precision each in2n variant is defined with, and what a server on a given device runs for it.

No nerfstudio import: `make serve` (in2n_demo/run.py) reads this on machines that only edit.

| variant    | IP2P precision | on the CPU |
|------------|----------------|------------|
| in2n       | fp32           | fp32       |
| in2n-small | fp16           | bf16       |
| in2n-tiny  | fp16           | bf16       |

On the CPU, fp16 has few native kernels and runs through slow paths (tiny-ip2p
on this project's 2-core Xeon: fp16 10% to 2x slower than fp32 from one run to
the next, bf16 within 15% of fp32: BENCHMARKS.md); bf16 is the CPU's half
precision (2 bytes a weight, as fp16; native on CPUs with AVX512-BF16 or AMX),
so a half-precision variant's server runs bf16 there.
"""

from __future__ import annotations

VARIANT_PRECISION: dict[str, str] = {"in2n": "fp32", "in2n-small": "fp16", "in2n-tiny": "fp16"}
"""The IP2P precision (the server's --precision) of each variant, as the method defines it."""


FIXED_PRECISION: dict[str, str] = {"flux-kontext": "bf16", "tiny-flux-kontext": "bf16"}
"""Backends that run one precision whatever the variant (FLUX overflows in fp16; fp32 needs about 48 GB for its
12B transformer alone): the trainer's precision check accepts it from them."""


def precision_on(precision: str, device: str) -> str:
    """The precision a server on `device` ("cpu", "cuda:0", ...) runs for a variant defined with `precision`:
    bf16 for fp16 on the CPU, else `precision` itself."""
    return "bf16" if precision == "fp16" and device.split(":")[0] == "cpu" else precision


def server_precision(method: str, device: str) -> tuple[str, str]:
    """(precision the server on `device` runs for `method`, a one-line reason when it is not the variant's, else "")."""
    if method not in VARIANT_PRECISION:
        raise ValueError(f"method must be one of {', '.join(VARIANT_PRECISION)}, got {method!r}")
    precision = VARIANT_PRECISION[method]
    served = precision_on(precision, device)
    if served != precision:
        return served, (
            f"{method} is defined with fp16 IP2P; on the CPU its server runs bf16 instead "
            f"(the CPU's half precision: fp16 has few CPU kernels and runs slower than fp32 there)"
        )
    return precision, ""
