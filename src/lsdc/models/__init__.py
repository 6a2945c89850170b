"""Networks from one registry; importing this package registers every model."""

from lsdc.models import (
    level_grader,  # noqa: F401  (registers level_grader: stage 2 of two_stage)
    localizer,  # noqa: F401  (registers localizer: stage 1 of two_stage)
    whole_study,  # noqa: F401  (registers resnet3d, segresnet, swinunetr, dynunet, vit)
)
from lsdc.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
