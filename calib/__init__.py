"""Calibration data and INT8 range estimation (installed as edgekd.calib)."""
