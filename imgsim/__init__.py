"""imgsim: image-similarity search — a convolutional autoencoder's embedding, KMeans and KNN.

`from imgsim import Searcher` is resolved lazily so `import imgsim` stays light (no torch import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Searcher", "__version__"]

if TYPE_CHECKING:
    from imgsim.index.search import Searcher


def __getattr__(name: str) -> Any:
    if name == "Searcher":
        from imgsim.index.search import Searcher

        return Searcher
    raise AttributeError(f"module 'imgsim' has no attribute {name!r}")
