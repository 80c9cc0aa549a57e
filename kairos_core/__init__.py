"""kairos-core: self-assembling edge clusters over a token-gated p2p network."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("kairos-core")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
