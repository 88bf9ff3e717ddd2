"""Keep TensorFlow's start-up log off the user's screen; the commands' own messages stay.

TensorFlow writes C++ log lines to stderr before and while it runs: oneDNN and CUDA-stub notices
and absl's "All log messages before absl::InitializeLog()" preamble while it is imported, then
e.g. "failed call to cuInit" and Grappler's "remapper failed" (harmless, see
`keras_vqpix/layers/residual.py`). `TF_CPP_MIN_LOG_LEVEL` silences the later ones only: absl
prints everything logged before its initialisation whatever the level (abseil-cpp PR #1718), so
the import itself runs with file descriptor 2 sent to a temporary file, which is shown only
when the import fails. Only the CLI does this; the library leaves logging to its user.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys
import tempfile
from collections.abc import Iterator

LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"


def quiet_tensorflow() -> None:
    """Quiet TensorFlow's C++ log for this process, unless the user set `TF_CPP_MIN_LOG_LEVEL`.

    Call before TensorFlow is imported (a later call changes nothing). Level 3 keeps only fatal
    messages: the errors TensorFlow logs on a CPU machine are notices (no CUDA driver, a graph
    rewrite skipped), and real failures reach the user as Python exceptions.
    """
    if LOG_LEVEL_VARIABLE in os.environ or "tensorflow" in sys.modules:
        return
    os.environ[LOG_LEVEL_VARIABLE] = "3"
    if not any(isinstance(finder, _QuietImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImportFinder())


@contextlib.contextmanager
def _stderr_to_file() -> Iterator[None]:
    """Send file descriptor 2 to a temporary file; replay it on stderr if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _QuietImportFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as usual and runs its import in `_stderr_to_file` (once)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """Wraps the package's loader: its module runs with stderr sent to a file."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with _stderr_to_file():
            self.loader.exec_module(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)
