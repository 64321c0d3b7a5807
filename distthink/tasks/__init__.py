"""Tasks: everything only one recipe needs. Tasks import the core; the core never imports a task.

`BUILTIN_TASKS` is the registry the engine reads by name (distthink/engine/task.py): a new task is one module
or folder here plus one line below. `SFTTask` is re-exported for tasks of your own that extend it.
"""

BUILTIN_TASKS = {
    "sft": "distthink.tasks.sft:SFTTask",
    "thinkrec": "distthink.tasks.thinkrec.task:ThinkRecTask",
    "molecule": "distthink.tasks.molecule.task:MoleculeTask",
}


def __getattr__(name):
    # Lazy: `import distthink.tasks` (the registry lookup) must not load the SFT task's dependencies.
    if name == "SFTTask":
        from distthink.tasks.sft import SFTTask

        return SFTTask
    raise AttributeError(f"module 'distthink.tasks' has no attribute {name!r}")
