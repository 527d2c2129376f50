"""FlowServe KV cache manager ``paged``: fixed-size blocks, ref counts, hash-chained prefix
caching with LRU eviction, copy-on-write after fork, and block export/import for PD transfer."""

from flowserve_paged_kv.block_pool import BlockPool
from flowserve_paged_kv.hashing import chain_hash, full_block_hashes
from flowserve_paged_kv.manager import PagedKVCacheManager

__all__ = ["BlockPool", "PagedKVCacheManager", "chain_hash", "full_block_hashes"]
