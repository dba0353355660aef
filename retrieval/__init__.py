"""Code that both sides run, so documents are embedded at build time by exactly the code that embeds questions on
the device: the ONNX sentence embedder (:mod:`.embedder`), the index connection (:mod:`.index`; the format
itself is data in :mod:`fieldpack.shared.index_format`) and hybrid search (:mod:`.search`).

Imports only :mod:`fieldpack.shared` of ours; never torch, transformers, builder or device.
"""
