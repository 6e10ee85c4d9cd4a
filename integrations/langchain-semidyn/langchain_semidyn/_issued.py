"""The marker Documents our compressor returned, by identity (bounded, strong references).

Metadata can be copied by anyone who saw a retrieval result, so a Document only counts as ours
when it is the very object `SemiDynamicDocumentCompressor` returned; holding a reference keeps
its ``id()`` from being reused while it is registered.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from langchain_core.documents import Document

_CAPACITY = 1 << 14
_issued: OrderedDict[int, Document] = OrderedDict()
_lock = threading.Lock()


def register(documents: Iterable[Document]) -> None:
    with _lock:
        for doc in documents:
            _issued[id(doc)] = doc
            _issued.move_to_end(id(doc))
        while len(_issued) > _CAPACITY:
            _issued.popitem(last=False)


def issued(doc: Document) -> bool:
    """Whether ``doc`` is a marker Document our compressor returned (the same object)."""
    with _lock:
        return _issued.get(id(doc)) is doc
