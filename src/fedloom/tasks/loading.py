"""Loading a task named by import path (``task = "package.module:factory"`` in an experiment file).

The module is imported normally; if that fails, it is looked for in the given
search directories (the experiment file's own directory first), so a module
next to the experiment file works without setting ``PYTHONPATH``. The factory
is called with the experiment's ``task_args`` and must return a
:class:`~fedloom.tasks.task.Task` (or the attribute may be a Task itself).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from fedloom.core.errors import FedloomError, TaskError
from fedloom.tasks.task import Task

__all__ = ["load_task"]


def _import(spec: str, module_name: str, search: Sequence[Path]) -> ModuleType:
    dirs = [str(Path(d).resolve()) for d in search]
    added = [d for d in dirs if d not in sys.path]
    sys.path[:0] = added
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        if exc.name is not None and (
            exc.name == module_name or module_name.startswith(exc.name + ".") or exc.name == top
        ):
            where = ", ".join(dirs) if dirs else "(no extra directory)"
            raise TaskError(
                f"task = {spec!r}: no module named {module_name!r}; searched {where} and the Python path. "
                f"Put {top}.py (or the package {top}/) next to the experiment file, install it, or add its "
                "directory to PYTHONPATH"
            ) from None
        raise TaskError(f"task = {spec!r}: importing {module_name!r} failed: {exc}") from exc
    except FedloomError:
        raise
    except Exception as exc:
        raise TaskError(
            f"task = {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        for d in added:
            if d in sys.path:
                sys.path.remove(d)


def load_task(spec: str, kwargs: Mapping[str, Any] | None = None, *, search: Sequence[Path] = ()) -> Task:
    """Import ``package.module:factory`` and build its task with ``kwargs``.

    Raises:
        TaskError: naming the import path and what went wrong (no such module,
            no such attribute, the factory rejected its arguments or raised, or
            returned something that is not a Task).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task = {spec!r}: expected an import path 'package.module:factory'")
    module = _import(spec, module_name, search)
    target = getattr(module, attr, None)
    if target is None:
        raise TaskError(
            f"task = {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute {attr!r}"
        )
    args = dict(kwargs or {})
    if isinstance(target, Task):
        if args:
            raise TaskError(
                f"task = {spec!r} is a Task, not a factory: it takes no task_args (got {sorted(args)})"
            )
        return target
    if not callable(target):
        raise TaskError(f"task = {spec!r}: {attr!r} is neither a Task nor a factory returning one")
    try:
        task = target(**args)
    except FedloomError:
        raise
    except TypeError as exc:
        raise TaskError(f"task = {spec!r}: task_args {args!r} were rejected by the factory: {exc}") from exc
    except Exception as exc:
        raise TaskError(f"task = {spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise TaskError(f"task = {spec!r}: the factory returned {type(task).__name__}, not a fedloom Task")
    return task
