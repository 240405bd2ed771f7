"""Training: the orchestrator and its parts (optimizer, schedule, checkpoints, speed monitor, logging)."""


def __getattr__(name):
    # Lazy so that importing a submodule (e.g. the speed monitor) does not build the orchestrator's imports.
    if name == "PretrainingOrchestrator":
        from ember.train.orchestrator import PretrainingOrchestrator

        return PretrainingOrchestrator
    raise AttributeError(name)


__all__ = ["PretrainingOrchestrator"]
