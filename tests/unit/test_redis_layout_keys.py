"""The Redis store's key names (redis_layout.py), computed without a server: buckets,
their hash tags and the slots those land in on a Redis Cluster."""

from __future__ import annotations

from collections import Counter

import pytest
from redis.crc import key_slot

from sagaline.exceptions import ConfigurationError
from sagaline.stores.redis_layout import CLUSTER_SLOTS, Layout, bucket_tags, hash_slot


def test_keys_of_a_saga_carry_the_tag_of_its_bucket() -> None:
    layout = Layout("sagaline", 16)
    sid = "0b9e2a4e-8d7c-4e3f-9a51-3c7d2f1e6b10"
    b = layout.bucket_of(sid)
    tag = "{" + bucket_tags(16)[b] + "}"
    assert layout.saga_key(sid) == f"sagaline:{tag}:saga:{sid}"
    assert layout.step_key(sid, "charge") == f"sagaline:{tag}:step:{sid}:charge"
    assert layout.due_key(b) == f"sagaline:{tag}:due"
    assert len({key_slot(k.encode()) for k in layout.saga_keys(sid, ["a", "b"])}) == 1


def test_the_tags_are_pinned() -> None:
    # Stored data is found through them: changing one would lose a bucket's sagas.
    assert bucket_tags(16)[:4] == ("b00-3", "b01-0", "b02-20", "b03-23")
    assert bucket_tags(16)[7] == "b07-40"
    assert Layout("p", 16).bucket_of("saga-1") == 9


@pytest.mark.parametrize("buckets", [1, 3, 16, 64, 256])
def test_each_bucket_has_its_own_equal_range_of_slots(buckets: int) -> None:
    tags = bucket_tags(buckets)
    assert len(set(tags)) == buckets
    for b, tag in enumerate(tags):
        assert hash_slot(tag) == key_slot(tag.encode())  # what Redis computes
        assert b * CLUSTER_SLOTS // buckets <= hash_slot(tag) < (b + 1) * CLUSTER_SLOTS // buckets


def test_three_masters_with_contiguous_slots_get_an_even_share_of_buckets() -> None:
    share = -(-CLUSTER_SLOTS // 3)
    per_master = Counter(hash_slot(t) // share for t in bucket_tags(16))
    assert sorted(per_master.values()) == [5, 5, 6]


def test_a_prefix_with_braces_or_a_bad_number_of_buckets_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="hash tags"):
        Layout("a{b}")
    with pytest.raises(ConfigurationError, match="between 1 and 256, got 257"):
        Layout("a", 257)
