"""Crane and Crane+ zero-shot anomaly detection.

    import crane
    det = crane.Detector.from_config(clip_weights="openai", checkpoint="checkpoints/trained_on_mvtec_crane/epoch_5.pth",
                                     features_list=(6, 12, 18, 24), soft_mean=True)
    out = det.predict(["part.png"])   # out.scores (N,), out.maps (N, S, S)
"""
from .detector import Detector, Prediction, build_model
from .models.crane import CraneConfig, CraneModel
from .models.errors import CheckpointMismatchError, WeightsNotFoundError

__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "build_model", "CraneConfig", "CraneModel", "CheckpointMismatchError",
           "WeightsNotFoundError", "__version__"]
