"""What the builder and the device must agree on: bundle format, manifest, signing, wire protocol, errors.

This package imports neither ``builder`` nor ``device``, and nothing heavy (no torch, no numpy at import).
"""
