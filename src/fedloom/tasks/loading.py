"""Loading a task named by import path (``task = "package.module:factory"`` in an experiment file).

The module is imported normally; if that fails, it is looked for in the given
search directories (the experiment file's own directory first), so a module
next to the experiment file works without setting ``PYTHONPATH``. The factory
is called with the experiment's ``task_args`` and must return a
:class:`~fedloom.tasks.task.Task` (or the attribute may be a Task itself).

:func:`load_dataset_task` does the same for ``data.dataset = "package.module:factory"``,
whose factory may return data alone; the experiment's ``[model]`` completes the task.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from fedloom.core.errors import FedloomError, TaskError
from fedloom.data.datasets import ArrayDataset
from fedloom.data.federated import FederatedDataset
from fedloom.models.zoo import instantiate_model
from fedloom.tasks.task import CentralData, ClientData, Task

__all__ = ["load_dataset_task", "load_task"]


def _import(spec: str, module_name: str, search: Sequence[Path], key: str = "task") -> ModuleType:
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
                f"{key} = {spec!r}: no module named {module_name!r}; searched {where} and the Python path. "
                f"Put {top}.py (or the package {top}/) next to the experiment file, install it, or add its "
                "directory to PYTHONPATH"
            ) from None
        raise TaskError(f"{key} = {spec!r}: importing {module_name!r} failed: {exc}") from exc
    except FedloomError:
        raise
    except Exception as exc:
        raise TaskError(
            f"{key} = {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
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


def _call(spec: str, key: str, target: Any, args: dict[str, Any]) -> Any:
    try:
        return target(**args)
    except FedloomError:
        raise
    except TypeError as exc:
        raise TaskError(f"{key} = {spec!r}: arguments {args!r} were rejected by the factory: {exc}") from exc
    except Exception as exc:
        raise TaskError(f"{key} = {spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc


def load_dataset_task(
    spec: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    model: str,
    model_kwargs: Mapping[str, Any] | None = None,
    search: Sequence[Path] = (),
) -> Task:
    """The task of ``data.dataset = spec``: import ``package.module:factory`` and call it with ``kwargs``.

    The factory (or the attribute itself, when it is not callable) may give a
    :class:`~fedloom.tasks.task.Task`, used as is; a ``CentralData`` or
    ``ClientData``; an :class:`~fedloom.data.datasets.ArrayDataset` (a central
    training set to partition); or a
    :class:`~fedloom.data.federated.FederatedDataset` (natural per-client data,
    e.g. generated on demand). Data alone is completed with the model ``model``
    (a zoo name or import path) built with ``model_kwargs``, cross-entropy and accuracy.

    Raises:
        TaskError: naming the import path and what went wrong.
    """
    key = "data.dataset"
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"{key} = {spec!r}: expected an import path 'package.module:factory'")
    module = _import(spec, module_name, search, key)
    target = getattr(module, attr, None)
    if target is None:
        raise TaskError(
            f"{key} = {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute {attr!r}"
        )
    args = dict(kwargs or {})
    plain = isinstance(target, Task | CentralData | ClientData | ArrayDataset | FederatedDataset)
    if plain and args:
        raise TaskError(
            f"{key} = {spec!r} is data, not a factory: it takes no data.args (got {sorted(args)})"
        )
    if not plain and not callable(target):
        raise TaskError(f"{key} = {spec!r}: {attr!r} is neither data nor a factory returning data")
    made = target if plain else _call(spec, key, target, args)
    if isinstance(made, Task):
        return made
    data: CentralData | ClientData
    if isinstance(made, CentralData | ClientData):
        data = made
    elif isinstance(made, ArrayDataset):
        data = CentralData(train=made, source=spec)
    elif isinstance(made, FederatedDataset):
        data = ClientData(train=made, source=spec)
    else:
        raise TaskError(
            f"{key} = {spec!r}: the factory returned {type(made).__name__}; expected a fedloom Task, "
            "CentralData, ClientData, ArrayDataset or FederatedDataset"
        )
    kw = dict(model_kwargs or {})
    return Task(model=lambda: instantiate_model(model, kw), data=data, name=spec)
