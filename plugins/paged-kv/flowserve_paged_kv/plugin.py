"""Hook implementations: KV cache manager ``paged`` (pure Python bookkeeping; cheap to import)."""

from __future__ import annotations

from flowserve_core import hookimpl
from flowserve_core.factories import KVCacheManagerFactory, Register
from flowserve_paged_kv.manager import PagedKVCacheManager


@hookimpl
def flowserve_register_kv_cache_managers(register: Register[KVCacheManagerFactory]) -> None:
    register("paged", PagedKVCacheManager)
