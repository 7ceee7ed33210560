"""INT8/FP8 post-training quantization of the exported graphs from real calibration frames.

`calibrate(CalibrationConfig(data=...))` is `iwarp calibrate`: see `pipeline` for the steps
and the output folder, `data` for the calibration cache, `quantize` for ModelOpt / ONNX
Runtime quantization and the layer groups that may stay FP32, `evaluate` for the metrics.
"""

from iwarp.calibration.data import (
    MIN_FRAMES,
    CalibrationData,
    FrameSet,
    cache_problems,
    load_cache,
    save_cache,
)
from iwarp.calibration.pipeline import (
    DEFAULT_EXCLUSIONS,
    CalibrationConfig,
    CalibrationGateError,
    GateThresholds,
    calibrate,
)
from iwarp.calibration.quantize import GROUPS, MODES, QUANTIZERS, choose_quantizer, modelopt_status

__all__ = [
    "DEFAULT_EXCLUSIONS",
    "GROUPS",
    "MIN_FRAMES",
    "MODES",
    "QUANTIZERS",
    "CalibrationConfig",
    "CalibrationData",
    "CalibrationGateError",
    "FrameSet",
    "GateThresholds",
    "cache_problems",
    "calibrate",
    "choose_quantizer",
    "load_cache",
    "modelopt_status",
    "save_cache",
]
