"""Replicas of `lmfleet serve` on several hosts sharing the fleet's decisions through
Redis (`--store redis://host:6379/0`; the `[store]` extra: redis-py).

Redis because it is what Python operators already run beside a proxy (LiteLLM's
router shares its state the same way), one small server with both halves needed
here: keys for the current picture and pub/sub for changes as they happen. The
facts are lmfleet/proxy/shared.py's, under `NAME:` (`--store-name`, default
"lmfleet", so several proxies can share one Redis):

- `NAME:nodes` the set of node URLs, `NAME:node:URL` a hash of each node's parts
  (status, weight version, ..., each JSON, each the latest any replica published;
  a fact about a node no longer in the set is dropped: only its introduction, with
  its entry, adds one, `PUT_NODE`);
  `NAME:gone` a set of removed URLs; `NAME:fleet` the fleet's versions: the snapshot
  a replica takes when it connects (or connects again);
- `NAME:facts` the channel every change is published on, with the sender's id (a
  replica ignores its own);
- `NAME:held` the channel each replica's requests in flight per node travel on, and
  only there (they are current or worthless). A replica of several workers
  (`--workers N`) is one voice there: its supervisor's hub sums its workers' counts,
  publishes the sum and tells each worker what the other replicas hold
  (lmfleet/proxy/hub.py), so the channel carries one message a tick per replica,
  not per process, and the workers subscribe to the facts only;
- `NAME:replica:ID` a key each replica refreshes every second (expiring after
  `PRESENCE_TTL`): who must answer a question (a `sync` before a weight update cuts
  a node's generations).

A replica that loses Redis keeps serving with what it knows, says so in
`/readiness` (`shared.connected` false, `shared.problem`), and connects again.
Every Redis call has a timeout.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio

from lmfleet.errors import ConfigError
from lmfleet.proxy.shared import SCRAPE_TIMEOUT, Unreadable

PUT_NODE = """
if ARGV[2] ~= '1' and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('PUBLISH', KEYS[4], ARGV[3])
return 1
"""
"""A node's fact, kept and sent in one step: an introduction (ARGV[2] '1') adds the
node; any other fact about a node not in the set (removed meanwhile) is dropped, so
that it cannot bring the node back (lmfleet/proxy/shared.py)."""
PRESENCE_TTL = 5
"""Seconds a replica counts as present after its last refresh (every second)."""
CALL_TIMEOUT = 5.0


def require_redis() -> Any:
    """redis-py's asyncio client, or a `ConfigError` naming the extra."""
    try:
        import redis.asyncio as redis_asyncio
    except ImportError as exc:
        raise ConfigError(
            "--store needs redis-py: pip install 'lmfleet[store]' (or pip install redis)"
        ) from exc
    return redis_asyncio


class StoreLink:
    """One replica's link to the store (the `Link` of lmfleet/proxy/shared.py)."""

    kind = "store"

    def __init__(
        self, url: str, name: str = "lmfleet", *, facts: bool = True, counts: bool = True
    ) -> None:
        """`facts`: take the snapshot, share the facts and answer questions (a
        replica's process); `counts`: send and hear the requests in flight (`held`).
        A worker of `--workers N` has only the facts, its supervisor's hub only the
        counts."""
        self._redis = require_redis()
        from redis.exceptions import RedisError

        self._failures: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"--store takes a redis:// (or rediss://, unix://) URL, got {url!r}")
        self._url = url
        self._name = name
        self.id = uuid.uuid4().hex[:12]
        self._client: Any = None
        self._pubsub: Any = None
        self._asked: dict[str, tuple[set[str], list[str], anyio.Event]] = {}
        self._channels = [self._key(c) for c, on in (("facts", facts), ("held", counts)) if on]
        self._facts = facts
        self._unreadable = Unreadable("the store link" if facts else "the hub's store link")

    def _broken(self, exc: BaseException) -> anyio.BrokenResourceError:
        """The store's failure as `/readiness` shows it: a call that timed out says so
        (its exception has no message of its own)."""
        if isinstance(exc, TimeoutError) and not str(exc):
            why = f"no answer within {CALL_TIMEOUT:g} s"
        else:
            why = str(exc) or type(exc).__name__
        return anyio.BrokenResourceError(f"the store at {self._url}: {why}")

    def _key(self, part: str) -> str:
        return f"{self._name}:{part}"

    async def open(self) -> dict[str, Any]:
        errors = self._errors()
        try:
            self._client = self._redis.from_url(
                self._url, socket_timeout=CALL_TIMEOUT, socket_connect_timeout=CALL_TIMEOUT
            )
            with anyio.fail_after(CALL_TIMEOUT):
                self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await self._pubsub.subscribe(*self._channels)
                if not self._facts:
                    return {"nodes": {}, "gone": [], "fleet": None}
                await self._present()
                urls = [_text(url) for url in await self._client.smembers(self._key("nodes"))]
                nodes = {}
                for url in urls:
                    parts = await self._client.hgetall(self._key(f"node:{url}"))
                    if parts:
                        nodes[url] = self._parts(parts)
                gone = await self._client.smembers(self._key("gone"))
                fleet = await self._client.get(self._key("fleet"))
        except errors as exc:
            raise self._broken(exc) from exc
        return {
            "nodes": nodes,
            "gone": [_text(url) for url in gone],
            "fleet": self._parts({"fleet": fleet}).get("fleet") if fleet else None,
        }

    def _parts(self, parts: dict[Any, Any]) -> dict[str, Any]:
        """A hash's fields, each JSON; one that is not is left out (and said)."""
        read: dict[str, Any] = {}
        for key, value in parts.items():
            try:
                read[_text(key)] = json.loads(value)
            except ValueError as exc:
                self._unreadable.skip(value, exc)
        return read

    def _errors(self) -> tuple[type[BaseException], ...]:
        return self._failures

    async def publish(self, message: dict[str, Any]) -> None:
        """Keep the fact (the snapshot's) and send it to the other replicas, at once."""
        op = message["op"]
        if op not in ("node", "gone", "fleet"):  # counts (`held`): sent, never kept
            await self._send(message)
            return
        data = json.dumps({**message, "from": self.id}, separators=(",", ":"))
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                if op == "node":  # its parts over the others (per part, last wins)
                    await self._put_node(message["url"], message["fact"], data)
                    return
                async with self._client.pipeline(transaction=True) as pipe:
                    url = message.get("url")
                    if op == "gone":
                        pipe.delete(self._key(f"node:{url}"))
                        pipe.srem(self._key("nodes"), url)
                        pipe.sadd(self._key("gone"), url)
                    elif op == "fleet":
                        pipe.set(self._key("fleet"), json.dumps(message["fact"]))
                    pipe.publish(self._key("facts"), data)
                    await pipe.execute()
        except self._errors() as exc:
            raise self._broken(exc) from exc

    async def _put_node(self, url: str, fact: dict[str, Any], data: str) -> None:
        keys = [self._key(f"node:{url}"), self._key("nodes"), self._key("gone")]
        parts = [item for k, v in fact.items() for item in (k, json.dumps(v))]
        intro = "1" if "entry" in fact else "0"
        await self._client.eval(PUT_NODE, 4, *keys, self._key("facts"), url, intro, data, *parts)

    async def receive(self) -> dict[str, Any]:
        while True:
            try:
                raw = await self._pubsub.get_message(timeout=1.0)
            except self._errors() as exc:
                raise self._broken(exc) from exc
            if raw is None or raw.get("type") != "message":
                continue
            try:
                message = json.loads(raw["data"])
            except ValueError as exc:
                self._unreadable.skip(raw["data"], exc)
                continue
            if not isinstance(message, dict):
                self._unreadable.skip(message, TypeError("not a JSON object"))
                continue
            if message.get("from") == self.id:
                continue
            if message.get("op") == "answer":
                asked = self._asked.get(str(message.get("id")))
                if asked is not None and message.get("asker") == self.id:
                    left, texts, done = asked
                    left.discard(str(message.get("from")))
                    texts.append(str(message.get("text", "")))
                    if not left:
                        done.set()
                continue
            return message

    async def answer(self, question: dict[str, Any], text: str) -> None:
        reply = {"op": "answer", "id": question["id"], "asker": question["from"], "text": text}
        await self._send(reply)

    async def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps({**message, "from": self.id}, separators=(",", ":"))
        channel = self._key("held" if message["op"] == "held" else "facts")
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                await self._client.publish(channel, data)
        except self._errors() as exc:
            raise self._broken(exc) from exc

    async def ask(self, kind: str) -> list[str]:
        """Ask every other present replica `kind`; their answers (bounded)."""
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                keys = [_text(k) async for k in self._client.scan_iter(self._key("replica:*"))]
        except self._errors() as exc:
            raise self._broken(exc) from exc
        others = {k.rsplit(":", 1)[-1] for k in keys} - {self.id}
        if not others:
            return []
        key = uuid.uuid4().hex
        texts: list[str] = []
        done = anyio.Event()
        self._asked[key] = (others, texts, done)
        try:
            await self._send({"op": kind, "id": key, "asker": self.id})
            with anyio.move_on_after(SCRAPE_TIMEOUT):
                await done.wait()
            return texts
        finally:
            self._asked.pop(key, None)

    async def _present(self) -> None:
        await self._client.set(self._key(f"replica:{self.id}"), "1", ex=PRESENCE_TTL)

    async def beside(self) -> None:
        """Say this replica is present, every second, while connected."""
        if not self._facts:  # the counts' link answers no questions
            await anyio.sleep_forever()
        while True:
            await anyio.sleep(1.0)
            try:
                with anyio.fail_after(CALL_TIMEOUT):
                    await self._present()
            except self._errors() as exc:
                raise self._broken(exc) from exc

    async def aclose(self) -> None:
        client, self._client = self._client, None
        pubsub, self._pubsub = self._pubsub, None
        with anyio.move_on_after(2):
            if pubsub is not None:
                await pubsub.aclose()
            if client is not None:
                await client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
