"""Import paths: finding an application by `module:attribute`, and pickling a deployment's class
or function by reference so that a worker node imports it from its own copy of the code.

cloudpickle already pickles importable classes by reference, but not a class decorated with
`@serve.deployment`: its module attribute is the Deployment, not the class. `by_reference`
wraps such a class so that unpickling imports the module and takes the Deployment's class.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import sysconfig
from typing import Any


def import_attr(import_path: str) -> Any:
    """The object at `module:attr.sub` or `module.attr` (the last dot splits, as in Ray)."""
    if ":" in import_path:
        module_name, _, attribute = import_path.partition(":")
    else:
        module_name, _, attribute = import_path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"expected module:attribute or module.attribute, got {import_path!r}")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def resolve(module: str, qualname: str, code_digest: str = "") -> Any:
    """Unpickling a reference: the class or function itself, even behind @serve.deployment.

    `code_digest` only makes the pickle, and so the deployment's version, differ when the
    code does."""
    from .application import Deployment

    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target.func_or_class if isinstance(target, Deployment) else target


class _Reference:
    def __init__(self, module: str, qualname: str, code_digest: str) -> None:
        self.args = (module, qualname, code_digest)

    def __reduce__(self) -> tuple[Any, tuple[str, str, str]]:
        return resolve, self.args


def by_reference(target: Any, code_digest: str) -> Any:
    """What to pickle in place of `target`: a reference if importing it by name gives it back,
    else `target` itself (a class defined in a function, say), which then travels by value."""
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return target
    try:
        found = resolve(module, qualname)
    except (ImportError, AttributeError):
        return target
    return _Reference(module, qualname, code_digest) if found is target else target


def code_digest(root: str) -> str:
    """A digest of the source of every loaded module whose file lies under `root`, except the
    installed packages (a virtualenv inside the project, say)."""
    root = os.path.join(os.path.abspath(root), "")
    installed = tuple(os.path.join(os.path.abspath(sysconfig.get_paths()[key]), "")
                      for key in ("purelib", "platlib", "stdlib"))
    digest = hashlib.sha256()
    for name, module in sorted(sys.modules.items()):
        path = os.path.abspath(getattr(module, "__file__", None) or "/")
        if not path.startswith(root) or path.startswith(installed):
            continue
        try:
            with open(path, "rb") as file:
                digest.update(name.encode() + b"\0" + file.read())
        except OSError:
            continue
    return digest.hexdigest()[:16]
