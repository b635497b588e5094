"""Calibration: turn sample text into the statistics TAP quantizes and routes with.

``data`` finds text and cuts token windows; ``stats`` holds running statistics; ``capture``
hooks a model to collect them; ``thresholds`` fits the token router and its thresholds.
"""

from .data import BUNDLED_SAMPLES, CalibrationText, load_calibration_text, make_windows, tokenize_text

__all__ = ["BUNDLED_SAMPLES", "CalibrationText", "load_calibration_text", "make_windows", "tokenize_text"]
