"""Calibration text sources, running statistics and their observers."""
from qdoctor.calib.collect import CalibrationConfig, CalibrationStats, calibrate
from qdoctor.calib.observers import LinearInputStats

__all__ = ["CalibrationConfig", "CalibrationStats", "calibrate", "LinearInputStats"]
