"""The import names before 0.2 (``worker``, ``contracts``, ``client``, ``gateway``), kept until 0.3.

They were generic enough to collide in an orchestrator's environment. An old name is the new
package itself, not a copy: ``worker.settings.Settings is llm_pool_worker.settings.Settings``, so
isinstance checks, monkeypatches and module state stay one. A finder placed first on the meta path
answers ``worker.x`` with ``llm_pool_worker.x``. It lives here because both distributions (the
worker's and the client's) carry this package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

RENAMED = {
    "worker": "llm_pool_worker",
    "contracts": "llm_pool_contracts",
    "client": "llm_pool_client",
    "gateway": "llm_pool_gateway",
}
REMOVED_IN = "0.3"


def stand_in(old: str) -> ModuleType:
    """Make ``old`` the new package (called by the old name's package as it is imported)."""
    new = RENAMED[old]
    warnings.warn(f"the import name {old!r} is now {new!r}; {old!r} goes in {REMOVED_IN}",
                  DeprecationWarning, stacklevel=3)  # the importer's line: the import system's frames are skipped
    module = importlib.import_module(new)
    sys.modules[old] = module
    if not any(isinstance(finder, _OldNames) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldNames())
    return module


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``old.x`` is ``new.x``: the loader hands over the module the new name already has."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        old, dot, rest = fullname.partition(".")
        # __main__ is left to the path finder, which finds the new package's own through its
        # __path__, so that `python -m worker` runs it (runpy asks a loader for code, this has none).
        if not dot or old not in RENAMED or rest.endswith("__main__"):
            return None
        if sys.modules.get(old) is not sys.modules.get(RENAMED[old]):  # another project's `client`, say
            return None
        real = importlib.util.find_spec(f"{RENAMED[old]}.{rest}")
        if real is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=real.submodule_search_locations is not None)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        old, _, rest = spec.name.partition(".")
        module = importlib.import_module(f"{RENAMED[old]}.{rest}")
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system has just set the old name's spec on the new module; give its own back.
        module.__spec__ = module.__spec__.loader_state if module.__spec__ else None
