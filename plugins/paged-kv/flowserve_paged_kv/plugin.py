"""Hook implementations: KV cache manager ``paged`` (pure Python bookkeeping; cheap to import)."""

from __future__ import annotations

from typing import Any

from flowserve_core import hookimpl
from flowserve_paged_kv.manager import PagedKVCacheManager


@hookimpl
def flowserve_register_kv_cache_managers(register: Any) -> None:
    register("paged", PagedKVCacheManager)
