"""adaattn-precision: device capability, precision policies and FP8 scaling for attention.

The planner of AdaAttn asks this package three questions per head: what does the device
run natively (:func:`detect`), what does the user accept (:class:`PrecisionPolicy`), and
how much error would a cheaper precision add (:func:`tensor_stats`,
:func:`select_precision`). :func:`quantize_fp8` is the FP8 scaling contract shared with
the FP8 kernels, and :class:`PrecisionStats` counts decisions across calls.

Run ``python -m adaattn_precision`` to print what this machine supports.
"""

from .__about__ import __version__
from .capability import (
    BF16_MIN_CAPABILITY,
    FP8_MIN_CAPABILITY,
    FP16_MIN_CAPABILITY,
    TF32_MIN_CAPABILITY,
    DeviceCapability,
    DeviceProperties,
    capability_from_properties,
    detect,
    triton_available,
)
from .fp8 import (
    FP8_DTYPES,
    dequantize_fp8,
    expand_scale,
    fp8_format_info,
    fp8_max,
    quantize_fp8,
)
from .policy import (
    FP8_FORMATS,
    GRANULARITIES,
    PRECISIONS,
    PRESETS,
    FP8Config,
    PrecisionPolicy,
    get_active_policy,
    is_fp8,
    torch_dtype,
)
from .select import CALIBRATION, PrecisionPlan, predict_attention_error, select_precision
from .stats import TensorStats, tensor_stats
from .usage import PrecisionStats

__all__ = [
    "BF16_MIN_CAPABILITY",
    "CALIBRATION",
    "FP8_DTYPES",
    "FP8_FORMATS",
    "FP8_MIN_CAPABILITY",
    "FP16_MIN_CAPABILITY",
    "GRANULARITIES",
    "PRECISIONS",
    "PRESETS",
    "TF32_MIN_CAPABILITY",
    "DeviceCapability",
    "DeviceProperties",
    "FP8Config",
    "PrecisionPlan",
    "PrecisionPolicy",
    "PrecisionStats",
    "TensorStats",
    "__version__",
    "capability_from_properties",
    "dequantize_fp8",
    "detect",
    "expand_scale",
    "fp8_format_info",
    "fp8_max",
    "get_active_policy",
    "is_fp8",
    "predict_attention_error",
    "quantize_fp8",
    "select_precision",
    "tensor_stats",
    "torch_dtype",
    "triton_available",
]
