"""KV transport ``ray`` between two actors of a local Ray instance: published in one
process, fetched in another, intact; released, it is gone; its publisher dying never yields
wrong bytes or a hang."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from kv_peers import peer_on  # noqa: E402  (after the importorskip above)


def test_kv_published_by_one_actor_is_fetched_by_another(local_ray):
    prefill, decode = peer_on(), peer_on()
    (_, prefill_pid), (_, decode_pid) = ray.get([prefill.where.remote(), decode.where.remote()])
    assert prefill_pid != decode_pid
    size = 3 * 2**20 + 5  # over Ray's inline limit: it lives in the object store
    locator, digest = ray.get(prefill.publish.remote(size, seed=1))
    small_locator, small_digest = ray.get(prefill.publish.remote(100, seed=2))
    assert ray.get(decode.fetch.remote(locator, size)) == digest
    assert ray.get(decode.fetch.remote(small_locator, 100)) == small_digest
    ray.get(decode.release.remote(locator))
    with pytest.raises(ray.exceptions.RayTaskError, match="no KV blocks are published"):
        ray.get(decode.fetch.remote(locator, size))
    orphan, orphan_digest = ray.get(prefill.publish.remote(size, seed=3))
    ray.kill(prefill)  # the prefill instance died before its decode fetched the KV
    deadline = time.monotonic() + 60
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:  # ray.kill is asynchronous: wait until it is dead
            ray.get(prefill.where.remote(), timeout=60)
            time.sleep(0.1)
    # The contract: intact bytes (Ray 2.60 keeps a borrowed object whose owner died), or a
    # KVLostError naming the cause; never other bytes, never a hang.
    try:
        assert ray.get(decode.fetch.remote(orphan, size), timeout=60) == orphan_digest
    except ray.exceptions.RayTaskError as exc:
        assert "are lost" in str(exc), exc
    ray.get(decode.release.remote(small_locator))
