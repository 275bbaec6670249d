"""`train.compile`: torch.compile for both training loops, in place (`module.compile()`), so parameters, buffers,
state-dict keys and checkpoints are those of the eager modules; inductor's on-disk caches persist across runs.

    mode = compile_mode(cfg.train.compile, device)    # None (eager) | "default" | "max-autotune"
    compile_in_place(pretraining_modules(model), mode)

`auto` compiles on CUDA and not on the CPU: on 2 CPU cores a cold inductor compile of a small Swin-UNETR step takes
minutes, more than a short run gains from it (benchmarks/compile_step.py measures both). Under `auto` a compile error
falls back to eager with a warning (GPU compilation has not been measured in this project yet); an explicit mode
raises it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

BACKEND = "inductor"   # tests set "aot_eager": the same dynamo and AOT-autograd graphs, no code generation
CACHE_DIR = Path.home() / ".cache" / "sslkit" / "inductor"


def compile_mode(setting: str, device: torch.device, zero_stage: int = 0) -> str | None:
    """torch.compile's mode for `train.compile` on `device`, or None for eager. `auto` stays eager on the CPU and
    under ZeRO-3 (its parameter hooks run inside the module call)."""
    if setting == "auto":
        return "default" if device.type == "cuda" and zero_stage < 3 else None
    return None if setting == "off" else setting


def use_persistent_caches() -> Path:
    """Inductor's caches (FX graphs, AOT-autograd graphs, generated kernels) in $TORCHINDUCTOR_CACHE_DIR, set to
    ~/.cache/sslkit/inductor unless the user set it: a later run of the same graphs skips code generation."""
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR)))
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return path


def compile_in_place(modules: list[nn.Module], mode: str | None, fallback: bool = False) -> int:
    """`module.compile(...)` each module (static shapes; a new input shape compiles once more). `fallback`: a
    compile error runs that frame eagerly with a warning instead of raising. Returns how many were compiled."""
    if mode is None or not modules:
        return 0
    use_persistent_caches()
    if fallback:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    options = {"backend": BACKEND, "dynamic": False}
    if BACKEND == "inductor":
        options["mode"] = mode
    for m in modules:
        m.compile(**options)
    return len(modules)


def eager():
    """A region where compiled modules run their eager code and nothing compiles: the probes, the plan's stride
    measurement and other calls off the training step (other shapes, eval mode) would each cost a compile."""
    return torch.compiler.set_stance("force_eager")


def has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def objective_heads(objectives: nn.Module) -> list[nn.Module]:
    """The heads of each objective of a Composite: its direct submodules that hold parameters (projectors,
    predictors, decoders), each called on tensors; the objectives' own forwards (views, losses) stay eager."""
    return [child for obj in objectives.objectives for child in obj.children() if has_parameters(child)]


def teacher_modules(objectives: nn.Module) -> list[nn.Module]:
    """The EMA teachers' modules (fp32 copies of the student's encoder / heads)."""
    return [m for t in objectives.teachers().values() for m in t.modules.values() if has_parameters(m)]


def pretraining_modules(model: nn.Module) -> list[nn.Module]:
    """What `train.compile` compiles in pretraining: the student encoder, the objectives' heads, the teachers."""
    return [model.encoder, *objective_heads(model.objectives), *teacher_modules(model.objectives)]
