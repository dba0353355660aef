"""fieldpack: put a domain-specific small language model on a device with no network."""

__version__ = "0.1.0"
