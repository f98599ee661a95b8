"""The Redis store's key layout, and how records are encoded in it.

Every key name is built here (the `Layout` methods), nowhere else.

Sagas are spread over a fixed number of buckets (`N`, 16 unless the store was
created with another number): a saga's bucket is `crc32(saga_id) mod N`, and
every key of a bucket carries the bucket's hash tag `{bNN-j}`. A saga's own keys
and the index entries that name it live in its bucket, so on Redis Cluster each
bucket is one hash slot and every write script touches one slot only: writes
stay atomic. Reads across sagas (lists, counts, due work, a node's claims) read
the N buckets and merge them. Retention (redis_gc.py) scans the status indexes of
every bucket, and deletes a saga tree, whose sagas lie in several buckets, root
first and then level by level, one script per bucket; a saga's idempotency key,
in another bucket, is freed afterwards by a script of its own bucket.

Layout (`p` is the prefix, default "sagaline"; `{b}` a bucket's hash tag, braces
included: `{b07-40}` for bucket 7 of 16 (`bucket_tags`: each bucket in its own
sixteenth of the cluster's slots), so a saga's hash is `sagaline:{b07-40}:saga:<id>`;
every hash field holds JSON)::

    {p}:layout                      string  JSON: `version` (2) and `buckets` (N),
                                            written by the store's first user; a store
                                            asked for another N refuses to run
    {p}:{b}:saga:<id>               hash    one field per SagaRecord attribute
                                            (`version` included), and `txn`, the
                                            count of `transact` writes to the saga
    {p}:{b}:step:<id>:<step>        hash    one field per StepRecord attribute
    {p}:{b}:steps:<id>              zset    the saga's step names scored by position
    {p}:{b}:events:<id>             list    the history, JSON per event; an event's seq
                                            is its 1-based index
    {p}:{b}:aborted:<id>            string  a saga id that may never be created: its
                                            creator lost an idempotency key (see
                                            redis_create.py)
    {p}:{k}:idem:<name>:<key>       string  id of the saga that owns an idempotency key;
                                            `k` is the bucket of (name, key), not of
                                            the saga (':' and '%' in the name
                                            percent-encoded)
    {p}:{b}:idx:created             zset    the bucket's saga ids, by created_at
    {p}:{b}:idx:status:<S>          zset    ... of sagas in status S
    {p}:{b}:idx:name:<name>         zset    ... of sagas of one name
    {p}:{b}:idx:ns:<S>:<name>       zset    both filters at once
    {p}:{b}:idx:parent:<id>         zset    the bucket's child sagas of saga <id>: a
                                            child is indexed in its own bucket, with
                                            its create, so listing a saga's children
                                            reads N small sets
    {p}:{b}:due                     zset    `<id>` (a saga) and `<id>\\0<step>` scored by
                                            due_at: what the sweeper must look at
    {p}:{b}:claims:<node>           zset    `<id>\\0<step>` of the RUNNING claims made
                                            by processes of Celery node <node>, scored
                                            by the claim's first lease
    {p}:finished                    channel PUBLISHed saga ids of sagas that finished
    {p}:ended                       channel ... and, just before, each one's id, NUL and
                                            its hash's fields and values as written
                                            (a JSON array), when under 7,000 bytes

Layout 1 (sagaline before Redis Cluster support) had the same keys without the
`{b}` part and one global index of each kind; `RedisStore.migrate()` (`sagaline db
upgrade`) rewrites a store of that layout into this one (redis_migrate.py).

No key is ever given a TTL: a saga stays until someone deletes it (an expiring
record silently loses long-running or stuck sagas).
"""

from __future__ import annotations

import binascii
import functools
import itertools
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..exceptions import ConfigurationError
from ..records import Event, SagaRecord, StepRecord
from .json_text import json_loads, json_value
from .rows import from_row, to_row

LAYOUT_VERSION = 2
DEFAULT_BUCKETS = 16
MAX_BUCKETS = 256
CLUSTER_SLOTS = 16384
# The largest message of the ended channel (as PostgreSQL's): sent to every
# listening process, a large saga is announced by its id alone and read.
ENDED_MAX_BYTES = 7000


def bucket_of(text: str, buckets: int) -> int:
    """The bucket of a saga id (or of an idempotency key's text): stable everywhere."""
    return zlib.crc32(text.encode("utf-8")) % buckets


def hash_slot(tag: str) -> int:
    """The Redis Cluster hash slot of a hash tag (CRC16/XMODEM mod 16384, as Redis)."""
    return binascii.crc_hqx(tag.encode("utf-8"), 0) % CLUSTER_SLOTS


@functools.cache
def bucket_tags(buckets: int) -> tuple[str, ...]:
    """The hash tag of each bucket: `bNN-j`, with the smallest j that puts bucket NN's
    slot in the NN-th of `buckets` equal ranges of the 16384 slots. A cluster whose
    masters serve contiguous ranges of slots (what `redis-cli --cluster create` and
    rebalancing make) then holds an even share of the buckets: 5/5/6 of 16 on three
    masters, where tags `b00`..`b15` would fall 4/8/4."""
    tags = []
    for b in range(buckets):
        lo, hi = b * CLUSTER_SLOTS // buckets, (b + 1) * CLUSTER_SLOTS // buckets
        tags.append(
            next(t for j in itertools.count() if lo <= hash_slot(t := f"b{b:02d}-{j}") < hi)
        )
    return tuple(tags)


@dataclass(frozen=True)
class Layout:
    """The key names of one store: its prefix and its number of buckets."""

    prefix: str
    buckets: int = DEFAULT_BUCKETS

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ConfigurationError(
                f"Redis store prefix {self.prefix!r} has '{{' or '}}': the store puts "
                "its own hash tags in its keys"
            )
        if not 1 <= self.buckets <= MAX_BUCKETS:
            raise ConfigurationError(
                f"Redis store buckets must be between 1 and {MAX_BUCKETS}, got {self.buckets}"
            )

    # -- buckets ---------------------------------------------------------------------

    def bucket_of(self, saga_id: str) -> int:
        return bucket_of(saga_id, self.buckets)

    def all_buckets(self) -> range:
        return range(self.buckets)

    def tag(self, bucket: int) -> str:
        """The start of every key of `bucket`: `{p}:{bNN-j}` (see bucket_tags)."""
        return f"{self.prefix}:{{{bucket_tags(self.buckets)[bucket]}}}"

    # -- keys of one saga (in the saga's bucket) -------------------------------------

    def saga_key(self, saga_id: str) -> str:
        return self.saga_key_prefix(self.bucket_of(saga_id)) + saga_id

    def saga_key_prefix(self, bucket: int) -> str:
        """What the id of a saga of `bucket` completes into its hash's key (children.lua)."""
        return f"{self.tag(bucket)}:saga:"

    def step_key(self, saga_id: str, step: str) -> str:
        return self.step_key_prefix(saga_id) + step

    def step_key_prefix(self, saga_id: str) -> str:
        """What a step's name completes into its hash's key (read_state.lua uses it)."""
        return f"{self.tag(self.bucket_of(saga_id))}:step:{saga_id}:"

    def steps_key(self, saga_id: str) -> str:
        return f"{self.tag(self.bucket_of(saga_id))}:steps:{saga_id}"

    def events_key(self, saga_id: str) -> str:
        return f"{self.tag(self.bucket_of(saga_id))}:events:{saga_id}"

    def aborted_key(self, saga_id: str) -> str:
        return f"{self.tag(self.bucket_of(saga_id))}:aborted:{saga_id}"

    def saga_keys(self, saga_id: str, steps: Iterable[str]) -> list[str]:
        """Every key that belongs to one saga alone (its index entries aside)."""
        return [
            self.saga_key(saga_id),
            self.steps_key(saga_id),
            self.events_key(saga_id),
            *(self.step_key(saga_id, s) for s in steps),
        ]

    def index_entries(self, saga: SagaRecord, steps: Iterable[StepRecord]) -> list[tuple[str, str]]:
        """(sorted set, member) of every index entry that may name the saga or its
        steps, all in its bucket: what deleting a saga removes besides saga_keys()."""
        return self.entries_of(
            saga.saga_id,
            saga.name,
            saga.status.value,
            saga.parent_saga_id,
            [(s.name, s.owner_node) for s in steps],
        )

    def entries_of(
        self,
        saga_id: str,
        name: str,
        status: str,
        parent_id: str | None,
        steps: Iterable[tuple[str, str | None]],
    ) -> list[tuple[str, str]]:
        """index_entries() from the fields it depends on: the saga's name, status and
        parent, and (name, owner_node) of each step."""
        sid, b = saga_id, self.bucket_of(saga_id)
        entries = [
            (self.created_index(b), sid),
            (self.name_index(b, name), sid),
            (self.status_index(b, status), sid),
            (self.name_status_index(b, status, name), sid),
            (self.due_key(b), sid),
        ]
        if parent_id is not None:
            entries.append((self.parent_index(b, parent_id), sid))
        for step, node in steps:
            entries.append((self.due_key(b), due_member(sid, step)))
            if node is not None:
                entries.append((self.claims_key(b, node), due_member(sid, step)))
        return entries

    # -- idempotency keys (in the bucket of name and key) ----------------------------

    def idem_key(self, name: str, key: str) -> str:
        return f"{self.tag(self.idem_bucket(name, key))}:idem:{key_part(name)}:{key}"

    def idem_bucket(self, name: str, key: str) -> int:
        """The bucket of an idempotency key: of (name, key), not of its saga."""
        return bucket_of(f"{key_part(name)}:{key}", self.buckets)

    # -- indexes of one bucket -------------------------------------------------------

    def created_index(self, bucket: int) -> str:
        return f"{self.tag(bucket)}:idx:created"

    def status_index(self, bucket: int, status: str) -> str:
        return f"{self.tag(bucket)}:idx:status:{status}"

    def name_index(self, bucket: int, name: str) -> str:
        return f"{self.tag(bucket)}:idx:name:{name}"

    def name_status_index(self, bucket: int, status: str, name: str) -> str:
        return f"{self.tag(bucket)}:idx:ns:{status}:{name}"

    def parent_index(self, bucket: int, parent_id: str) -> str:
        return f"{self.tag(bucket)}:idx:parent:{parent_id}"

    def due_key(self, bucket: int) -> str:
        return f"{self.tag(bucket)}:due"

    def claims_key(self, bucket: int, node: str) -> str:
        return f"{self.tag(bucket)}:claims:{node}"

    # -- store-wide keys -------------------------------------------------------------

    def layout_key(self) -> str:
        return f"{self.prefix}:layout"

    def finished_channel(self) -> str:
        return f"{self.prefix}:finished"

    def ended_channel(self) -> str:
        return f"{self.prefix}:ended"


@dataclass(frozen=True)
class LegacyLayout:
    """The key names of layout 1 (one index of each kind, no buckets), which only
    the migration reads."""

    prefix: str

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def marker(self) -> str:
        """A key every layout-1 store with a saga has."""
        return self.key("idx", "created")

    def saga_pattern(self) -> str:
        return self.key("saga", "*")

    def saga_id_of(self, saga_key: str) -> str:
        return saga_key[len(self.key("saga", "")) :]

    def saga_keys(self, saga_id: str, steps: Iterable[str]) -> list[str]:
        return [
            self.key("saga", saga_id),
            self.key("steps", saga_id),
            self.key("events", saga_id),
            *(self.key("step", saga_id, s) for s in steps),
        ]

    def shared_patterns(self) -> list[str]:
        """Patterns of the keys no one saga owns: indexes and idempotency keys."""
        return [self.key("idx", "*"), self.key("idem", "*"), self.key("claims", "*")]

    def due_key(self) -> str:
        return self.key("due")


def score(x: float) -> str:
    # repr keeps every digit of a timestamp; Redis parses it (and 'inf') as a score.
    return repr(float(x))


def key_part(name: str) -> str:
    """A saga name inside a key that has more after it: ':' (and '%', the escape) are
    percent-encoded, so that name "a:b" with key "c" and name "a" with key "b:c" do not
    share one key. Names without either character are unchanged."""
    return name.replace("%", "%25").replace(":", "%3A")


def due_member(saga_id: str, step: str) -> str:
    return f"{saga_id}\0{step}"


def fields(rec: SagaRecord | StepRecord, *, version: int | None = None) -> list[str]:
    """The record as flat hash field/value pairs, each value JSON."""
    row = to_row(rec)
    if version is not None:
        row["version"] = version
    return [part for name, value in row.items() for part in (name, json_value(value))]


def saga_record(h: dict[str, str]) -> SagaRecord:
    return from_row(SagaRecord, decoded(h))


def step_record(h: dict[str, str]) -> StepRecord:
    return from_row(StepRecord, decoded(h))


def ended_message(saga_id: str, saga_fields: list[str]) -> str | None:
    """What write.lua publishes on the ended channel for a saga whose hash it sets to
    `saga_fields` (field, value, ...): the id, NUL (in no saga id: filters.findable),
    and the fields as a JSON array. None when it would pass ENDED_MAX_BYTES."""
    message = saga_id + "\0" + json.dumps(saga_fields)
    return message if len(message.encode()) <= ENDED_MAX_BYTES else None


def decode_ended(message: str) -> tuple[str, Callable[[], SagaRecord]]:
    """The saga id of an `ended_message`, and how to decode its saga as a read
    decodes the saga's hash (`saga_record` of HGETALL's field -> value)."""
    saga_id, sep, body = message.partition("\0")
    if not sep:
        raise ValueError("not an ended saga")

    def record() -> SagaRecord:
        flat = json.loads(body)
        return saga_record(dict(zip(flat[::2], flat[1::2], strict=True)))

    return saga_id, record


def decoded(h: dict[str, str]) -> dict[str, Any]:
    # `txn` is no record field, and fields written by a newer sagaline are unknown
    # here: from_row ignores both rather than failing on them.
    return {k: json_loads(v) for k, v in h.items() if k != "txn"}


def event_json(e: Event) -> str:
    # saga_id is the list's key and seq its index: neither is stored in the event.
    row = to_row(e)
    del row["saga_id"], row["seq"]
    row["detail"] = e.detail or {}
    return json.dumps(row)


def event_record(saga_id: str, seq: int, raw: str) -> Event:
    event = from_row(Event, {**json.loads(raw), "saga_id": saga_id, "seq": seq})
    event.detail = event.detail or {}
    return event


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
