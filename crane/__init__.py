"""Crane and Crane+ zero-shot anomaly detection."""
__version__ = "0.1.0"
