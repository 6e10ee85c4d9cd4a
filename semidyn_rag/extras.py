"""Optional dependencies: import them where they are used, or fail naming the extra to install.

The core (compress, store, generate, train) needs none of these. Each is imported at its use
site through :func:`require`, so a missing one is an error that says which extra brings it
(``pip install 'semidyn-rag[parquet]'``) rather than a bare ``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS: dict[str, str] = {
    "pyarrow": "parquet",  # .parquet corpora, seeds and evaluation files
    "matplotlib": "plot",  # the evaluation's Pareto plot
    "httpx": "synth",  # the OpenAI-compatible teacher of `semidyn synth`
    "ray": "ray",  # distributed precompression
}
"""Top-level module -> the ``semidyn-rag`` extra that installs it."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str, *, extra: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"pyarrow.parquet"``) or raise :class:`MissingExtraError`.

    ``purpose`` says what needed it (e.g. ``"reading .parquet files"``); the error names
    ``extra``, by default the one :data:`EXTRAS` lists for the top-level package.

    Raises:
        MissingExtraError: the top-level package is not importable.
    """
    top = module.partition(".")[0]
    extra = extra or EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Only the package itself being absent is "install the extra"; a broken install of it
        # (a missing transitive module) keeps its own error.
        if exc.name is not None and exc.name != top and not module.startswith(exc.name):
            raise
        raise MissingExtraError(
            f"{purpose} needs the optional dependency {top!r}, which is not installed: "
            f"pip install 'semidyn-rag[{extra}]'"
        ) from exc
