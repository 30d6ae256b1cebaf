"""No module is loaded after the front gave up its privileges.

The front becomes an unprivileged user that may not be able to read the Python it runs
(a checkout or a pyenv under /root, 0700): a module imported later would fail there, in
the middle of a session. So everything it will need is imported first, and any later
import is logged as a warning (one line naming it), which the tests look for.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

log = logging.getLogger(__name__)

# Imported on first use by the standard library or our dependencies, after the start.
LATE_IMPORTS = (
    "concurrent.futures.thread",
    "encodings.idna",
    "encodings.latin_1",
    "encodings.ascii",
    "encodings.utf_8",
)


class _LateImport(MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        log.warning("module %s imported after the front dropped its privileges", fullname)
        return None  # the usual finders go on; it may fail for want of permission


def freeze_imports() -> None:
    """Load what the front uses lazily, then report any import from here on."""
    for name in LATE_IMPORTS:
        importlib.import_module(name)
    sys.meta_path.insert(0, _LateImport())
