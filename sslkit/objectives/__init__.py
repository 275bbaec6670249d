from sslkit.objectives.base import ForwardContext, Objective, ObjectiveOutput, pooled
from sslkit.objectives.registry import build_objective, objective_names, register_objective

__all__ = ["ForwardContext", "Objective", "ObjectiveOutput", "pooled", "build_objective", "objective_names",
           "register_objective"]
