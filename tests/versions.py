"""A small registered version for tests of the registry, promotions and roles: a 2-class
MLP with the tags every version needs (flywheel.registry.VERSION_TAGS)."""

from __future__ import annotations

from flywheel.modelspec import ModelSpec, build_model
from flywheel.registry import ModelVersion, Registry


def publish_version(
    registry: Registry, parent: str = "", *, gate: str = "test", input_dim: int = 2, hidden: int = 2
) -> ModelVersion:
    """Register an untrained version whose parent is `parent` ("" for none: a manual one)."""
    spec = ModelSpec(input_dim=input_dim, hidden=[hidden], labels=["a", "b"])
    return registry.publish(
        spec,
        build_model(spec),
        tags={
            "parent_version": parent,
            "source": "online" if parent else "manual",
            "examples": "[0,10)",
            "epsilon": "none",
            "delta": "none",
            "gate": gate,
        },
    )
