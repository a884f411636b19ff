"""Largest-margin losses and adaptive-margin heads as native PML losses."""

from .ada_cos_loss import AdaCosLoss
from .ada_face_loss import AdaFaceLoss
from .base_margin_head_loss import BaseMarginHeadLoss
from .curricular_face_loss import CurricularFaceLoss
from .dynamic_margin_loss import DynamicMarginLoss
from .elastic_face_loss import ElasticFaceLoss
from .generalized_margin_softmax_loss import GeneralizedMarginSoftmaxLoss
from .largest_margin_softmax_loss import LargestMarginSoftmaxLoss
from .mag_face_loss import MagFaceLoss

__all__ = [
    "AdaCosLoss",
    "AdaFaceLoss",
    "BaseMarginHeadLoss",
    "CurricularFaceLoss",
    "DynamicMarginLoss",
    "ElasticFaceLoss",
    "GeneralizedMarginSoftmaxLoss",
    "LargestMarginSoftmaxLoss",
    "MagFaceLoss",
]
