"""Importance estimation: calibration statistics and the registry of estimators."""

from saap.importance.estimators import ESTIMATORS, UnitScores, estimate
from saap.importance.stats import CalibrationStats, collect_statistics

__all__ = [
    "ESTIMATORS",
    "CalibrationStats",
    "UnitScores",
    "collect_statistics",
    "estimate",
]
