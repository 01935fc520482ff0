"""Settings and the model registry (no torch, no Flask)."""

from config.models import ModelRegistry, ModelSpec, resolve_model
from config.settings import Settings
from config.values import SettingsError

__all__ = ["ModelRegistry", "ModelSpec", "Settings", "SettingsError", "resolve_model"]
