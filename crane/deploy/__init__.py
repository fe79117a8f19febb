"""Serving exported Crane graphs without the training stack: numpy, Pillow and ONNX Runtime or OpenVINO.

Nothing here imports torch. ``python -m crane export`` writes the graph;
:func:`load_model` runs it (see :mod:`crane.deploy.runtime`); :func:`preprocess`
is the CLIP preprocessing of :mod:`crane.data.image`, reproduced with numpy.
"""
from crane.deploy.image import ImageReadError, load_rgb, preprocess
from crane.deploy.metadata import ExportInfo, NotACraneExport
from crane.deploy.runtime import BACKENDS, DeployedModel, DeployPrediction, load_model

__all__ = ["BACKENDS", "DeployPrediction", "DeployedModel", "ExportInfo", "ImageReadError", "NotACraneExport",
           "load_model", "load_rgb", "preprocess"]
