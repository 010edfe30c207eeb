"""tapestry: interleaved image-text generation over one Document format."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("tapestry")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

from tapestry.errors import TapestryError

__all__ = ["TapestryError", "__version__"]
