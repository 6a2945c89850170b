"""Networks from one registry; importing this package registers every model."""

from lsdc.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
