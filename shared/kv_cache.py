"""The KV-cache size formula, defined once: the builder writes it into the manifest and `fieldpack plan` ranks
candidates with it; the device recomputes it for the ``n_ctx`` it is configured with.

llama.cpp keeps, per token and layer, one K and one V vector per KV head (f16 by default)::

    kv_bytes(n_ctx) = 2 (K and V) * n_layer * n_head_kv * head_dim * bytes_per_element * n_ctx

``head_dim`` is ``n_embd / n_head`` for most architectures but is set on its own by some (Gemma 3: 256 with
n_embd 640 and 4 heads), so callers pass it. Grouped-query attention (Ainslie et al. 2023) is why ``n_head_kv``
can be below ``n_head``.

For models with sliding-window layers (Gemma 2/3) the device sizes those layers' cache to the window
(``device.runtime.load_llama``), so there the formula is an upper bound (Gemma 3 270M at n_ctx 2048: 36 MiB
computed, 21 MiB allocated by llama.cpp).
"""

from __future__ import annotations

#: Bytes per cached element: llama.cpp's default KV cache type is f16.
KV_BYTES_PER_ELEMENT = 2


def kv_cache_bytes(n_ctx: int, *, n_layer: int, n_head_kv: int, head_dim: int,
                   bytes_per_element: int = KV_BYTES_PER_ELEMENT) -> int:
    """Size of the K and V caches for ``n_ctx`` tokens, in bytes (see the module doc for the formula).

    Args:
        n_ctx: context length in tokens.
        n_layer: transformer blocks.
        n_head_kv: key/value heads per block.
        head_dim: size of one head's K (and V) vector, in elements.
        bytes_per_element: 2 for an f16 cache, 1 for q8_0-ish caches.
    """
    return 2 * n_layer * n_head_kv * head_dim * bytes_per_element * n_ctx
