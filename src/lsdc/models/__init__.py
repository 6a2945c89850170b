"""Networks from one registry (per role: whole_study, localizer, grader); importing this package
registers every model."""

from lsdc.models import (
    level_grader,  # noqa: F401  (registers the graders: stage 2 of two_stage)
    localizer,  # noqa: F401  (registers the localizers: stage 1 of two_stage)
    whole_study,  # noqa: F401  (registers resnet3d, segresnet, swinunetr, dynunet, vit)
)
from lsdc.models.registry import ROLES, create_model, list_models, model_roles, register_model

__all__ = ["ROLES", "create_model", "list_models", "model_roles", "register_model"]
