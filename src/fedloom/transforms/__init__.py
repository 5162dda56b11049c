"""Update transforms: composable client/server stages on model deltas."""

from fedloom.transforms.pipeline import Identity, NormClip, Pipeline, UpdateTransform

__all__ = ["Identity", "NormClip", "Pipeline", "UpdateTransform"]
