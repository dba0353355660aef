"""fieldpack: put a domain-specific small language model on a device with no network.

Installed, ``fieldpack`` is the only top-level import name: ``fieldpack.shared`` (formats, protocol, errors),
``fieldpack.retrieval`` (embedder, index, search: run on both sides), ``fieldpack.builder`` (build host),
``fieldpack.device`` (install, runtime, daemon) and ``fieldpack.cli`` (the thin command line).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fieldpack")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
