"""Optional-dependency handling: ``transformers`` is only needed for training and evaluation."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

from weightsmith.errors import WeightsmithError

INSTALL_HINT = "pip install 'weightsmith[train]'"


class MissingDependencyError(WeightsmithError):
    """An optional package needed by the requested feature is not installed."""

    exit_code = 7


def require_transformers() -> ModuleType:
    """Import ``transformers`` lazily so that ``import weightsmith`` works without it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise MissingDependencyError(
            f"fine-tuning and evaluation need the 'transformers' package ({err}); "
            f"install it with: {INSTALL_HINT}"
        ) from None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars; we report what matters ourselves.

    The state is restored afterwards so a host application's own logging settings survive.
    """
    transformers = require_transformers()
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
