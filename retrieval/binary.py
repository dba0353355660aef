"""Binary codes for approximate nearest-neighbour search, rescored with float vectors.

Codes are sign random projections (SimHash; Charikar, "Similarity estimation techniques from rounding
algorithms", STOC 2002): for a Gaussian ``dim x bits`` matrix ``P``, bit ``j`` of a vector's code is
``(P.T @ v)[j] > 0``, and the Hamming distance of two codes estimates their angle
(``E[hamming] = bits * angle / pi``). More bits than dimensions tighten the estimate: on all-MiniLM-L6-v2
(384-d) vectors of 100k chunks and real questions, the plain sign of each coordinate (384 bits, sqlite-vec's
``vec_quantize_binary``) with 4x candidates rescored kept recall@10 vs exact search at 0.93, 1536 projected
bits with 8x rescored 0.998 (README "Retrieval at scale"). Search = Hamming distance to every code (numpy
popcount over the codes held in memory: 192 bytes per chunk), then the best ``n * oversample`` candidates
are rescored with their cosine from the stored vectors.

The builder makes the projection and the codes (:func:`projection`, :func:`encode`); the device loads them
(:class:`BinaryCodes`) and encodes each query the same way.
"""

from __future__ import annotations

import numpy as np

#: Seed of the projection matrix the builder draws (recorded in the index as the matrix itself).
PROJECTION_SEED = 0x5EED


def projection(dimension: int, bits: int, *, seed: int = PROJECTION_SEED) -> np.ndarray:
    """A Gaussian projection for :func:`encode`: ``(dimension, bits) float32``, entries N(0, 1).

    ``bits`` must be a positive multiple of 64 (codes are compared as uint64 words)."""
    if dimension < 1 or bits < 64 or bits % 64:
        raise ValueError(f"projection {dimension}x{bits}: dimension >= 1 and bits a positive multiple of 64")
    return np.random.default_rng(seed).standard_normal((dimension, bits)).astype("<f4")


def encode(vectors: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Binary codes of ``vectors`` ``(n, dim)`` (or one ``(dim,)``) under ``proj`` ``(dim, bits)``.

    Returns:
        ``(n, bits // 8) uint8`` (or ``(bits // 8,)``), bit ``j`` at byte ``j // 8``, position ``j % 8``
        (least significant first, the order of sqlite-vec's ``vec_quantize_binary``).
    """
    v = np.asarray(vectors, dtype=np.float32)
    # one query: einsum, not BLAS gemv, whose thread pool costs ~10 ms per call on a busy CPU (measured here)
    z = np.einsum("i,ij->j", v, proj) if v.ndim == 1 else v @ proj
    return np.packbits(z > 0, axis=-1, bitorder="little")


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming(codes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distance of each row of ``codes`` ``(n, nbytes) uint8`` to ``query`` ``(nbytes,) uint8``.

    Returns ``(n,) uint16``. Uses ``np.bitwise_count`` on uint64 words (numpy >= 2), else a byte lookup table.
    """
    if hasattr(np, "bitwise_count") and codes.shape[1] % 8 == 0:
        x = codes.view(np.uint64) ^ query.view(np.uint64)
        return np.bitwise_count(x).sum(axis=1, dtype=np.uint16)
    return _POPCOUNT8[codes ^ query].sum(axis=1, dtype=np.uint16)


class BinaryCodes:
    """The codes of an index held in memory, with the projection that made them.

    Args:
        ids: ``(n,) int64`` chunk ids, row ``i`` of ``codes`` is chunk ``ids[i]``.
        codes: ``(n, bits // 8) uint8``.
        proj: ``(dim, bits) float32``.
    """

    def __init__(self, ids: np.ndarray, codes: np.ndarray, proj: np.ndarray) -> None:
        if (codes.ndim != 2 or codes.shape[0] != ids.shape[0] or codes.shape[1] * 8 != proj.shape[1]
                or proj.shape[1] % 64):
            raise ValueError(f"codes {codes.shape} do not fit {ids.shape[0]} ids and projection {proj.shape}")
        self.ids = ids
        # word-major (bits/64, n) uint64: the distance is a sum of one contiguous popcount per word, 3-4x faster
        # than popcounting (n, bits/64) rows and summing along the short axis
        self.words = np.ascontiguousarray(np.ascontiguousarray(codes).view("<u8").T)
        self.proj = proj

    @property
    def nbytes(self) -> int:
        """Memory the codes, ids and projection hold (bytes)."""
        return int(self.ids.nbytes + self.words.nbytes + self.proj.nbytes)

    def distances(self, qvec: np.ndarray) -> np.ndarray:
        """``(n,) uint16`` Hamming distance of every code to the code of ``qvec`` (``(dim,) float32``)."""
        q = encode(qvec, self.proj).view("<u8")
        if not hasattr(np, "bitwise_count"):  # numpy < 2
            return hamming(np.ascontiguousarray(self.words.T).view(np.uint8), q.view(np.uint8))
        acc = np.zeros(self.words.shape[1], dtype=np.uint16)
        for word, qword in zip(self.words, q):
            acc += np.bitwise_count(word ^ qword)
        return acc

    def candidates(self, qvec: np.ndarray, m: int) -> list[int]:
        """The ``m`` chunk ids whose codes are nearest to ``qvec``'s code (Hamming), nearest first.

        Args:
            qvec: ``(dim,) float32`` query embedding.
            m: how many (all when the index holds fewer).
        """
        n = self.ids.shape[0]
        if n == 0 or m < 1:
            return []
        dist = self.distances(qvec)
        if m < n:
            part = np.argpartition(dist, m - 1)[:m]
            order = part[np.argsort(dist[part], kind="stable")]
        else:
            order = np.argsort(dist, kind="stable")
        return [int(i) for i in self.ids[order]]
