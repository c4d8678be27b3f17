"""qdoctor: diagnose, treat, verify and export W8A8 quantization of LLaMA-like models."""

__version__ = "0.1.0"

from qdoctor.api import (  # noqa: E402
    CalibrationConfig,
    CalibrationStats,
    calibrate,
    compare_schemes,
    load,
    perplexity,
    quantize,
    restore,
)
from qdoctor.errors import QDoctorError  # noqa: E402

__all__ = ["__version__", "load", "calibrate", "quantize", "restore", "perplexity", "compare_schemes",
           "CalibrationConfig", "CalibrationStats", "QDoctorError"]

from qdoctor import scan  # noqa: E402,F401  (subpackage: qdoctor.scan.scan(model, tok, config))
