"""Where a Milvus gallery lives and how its served name moves: connections, the pointer file,
collection and alias names, the atomic switch and the pruning of old collections.

    data/gallery/milvus.json     {"uri": "../milvus.db", "alias": "visrec_gallery_1a2b3c4d", ...}
    alias visrec_gallery_1a2b3c4d -> collection visrec_gallery_1a2b3c4d__v000003_9f2e41aa

The gallery directory holds only the pointer (so every caller keeps passing a path, and the
directory's update lock still serialises writers on one host). The *served name* is a Milvus
alias; a new version of the gallery is a new collection, published by moving the alias in one
call (``alter_alias``), so a reader resolving the alias gets the old or the new collection,
never half of one. Old collections of the alias are then dropped, keeping the newest
``keep_versions`` (and never the live one: Milvus Lite 3.2 does not refuse to drop a
collection an alias points to, so this module checks).

The token comes from ``VISREC_MILVUS_TOKEN``, never from params or the pointer file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from visrec.config import MilvusConfig
from visrec.index.gallery_store import MILVUS_POINTER

logger = logging.getLogger(__name__)

POINTER_FILE = MILVUS_POINTER  # the Faiss store refuses to save into a directory holding one
POINTER_FORMAT = 1
TOKEN_ENV = "VISREC_MILVUS_TOKEN"
META_PROPERTY = "visrec.meta"  # the gallery's metadata (fingerprint, next_id, ...) as JSON
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VERSION_RE = re.compile(r"__v(\d{6,})_[0-9a-f]{8}$")
_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


@dataclass
class MilvusSettings(MilvusConfig):
    """How to reach Milvus and how galleries behave there: params ``index.milvus``
    (:class:`~visrec.config.MilvusConfig`, whose fields and defaults it inherits), checked."""

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.alias_prefix):
            raise ValueError(f"index.milvus.alias_prefix {self.alias_prefix!r} is not a valid Milvus name: "
                             "use letters, digits and underscores, not starting with a digit")
        if self.keep_versions < 1:
            raise ValueError(f"index.milvus.keep_versions must be >= 1, got {self.keep_versions}")
        if self.insert_batch < 1:
            raise ValueError(f"index.milvus.insert_batch must be >= 1, got {self.insert_batch}")
        if not is_server_uri(self.uri) and not self.uri.endswith(".db"):
            raise ValueError(f"index.milvus.uri {self.uri!r} is neither a server URI (http://host:19530) nor a "
                             "Milvus Lite data dir, whose name must end in .db (pymilvus opens Lite by that suffix)")
        if is_server_uri(self.uri) and "@" in self.uri.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("index.milvus.uri holds credentials (user:password@): they would be written to the "
                             f"gallery's {POINTER_FILE} and shown by `visrec gallery info`; put them in "
                             f"{TOKEN_ENV} (user:password or an API key) and give the bare URI")

    @classmethod
    def from_config(cls, milvus_cfg: MilvusConfig) -> MilvusSettings:
        return cls(**asdict(milvus_cfg))


def is_server_uri(uri: str) -> bool:
    return "://" in uri


def connect(uri: str):
    """One ``MilvusClient`` per URI per process (it is thread-safe; a Lite data dir can only be
    opened once per process anyway)."""
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    # Milvus Lite 3.2 returns no MVCC timestamp to iterators; pymilvus then warns on every page
    # and uses its own timestamp, which is right for a single-node engine. (Set after pymilvus's
    # import, which configures its loggers.)
    with _clients_lock:
        if uri not in _clients:
            logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
            try:
                _clients[uri] = MilvusClient(uri=uri, token=os.environ.get(TOKEN_ENV, ""))
            except MilvusException as exc:
                hint = ("is it running, and is VISREC_MILVUS_TOKEN right?" if is_server_uri(uri) else
                        "a Milvus Lite data dir is opened by one process at a time: another process (the "
                        "service?) holds it. Serve it to all of them with `python -m milvus_lite server "
                        f"--data-dir {uri} --host 127.0.0.1 --port 19530` and set index.milvus.uri: "
                        "http://127.0.0.1:19530")
                raise ConnectionError(f"cannot open Milvus at {uri}: {exc.message}; {hint}") from None
        return _clients[uri]


# ----------------------------------------------------------------------------- the pointer file


def has_pointer(path: str | Path) -> bool:
    return (Path(path) / POINTER_FILE).is_file()


def read_pointer(path: str | Path) -> tuple[str, str, MilvusSettings]:
    """``(uri, alias, settings)`` of the Milvus gallery whose pointer is in ``path``."""
    path = Path(path)
    raw = json.loads((path / POINTER_FILE).read_text(encoding="utf-8"))
    if raw.get("format") != POINTER_FORMAT:
        raise ValueError(f"{path / POINTER_FILE} has format {raw.get('format')!r}, this code reads format "
                         f"{POINTER_FORMAT}; rebuild the gallery (`visrec gallery build LIST`)")
    uri = raw["uri"]
    if not is_server_uri(uri) and not os.path.isabs(uri):
        uri = os.path.normpath(path.resolve() / uri)
    settings = MilvusSettings(**{**raw["settings"], "uri": uri})
    return uri, raw["alias"], settings


def write_pointer(path: str | Path, alias: str, settings: MilvusSettings) -> None:
    """Write ``path/milvus.json`` atomically; a Lite data dir is recorded relative to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    uri = settings.uri if is_server_uri(settings.uri) else os.path.relpath(Path(settings.uri).resolve(),
                                                                           path.resolve())
    body = {"format": POINTER_FORMAT, "backend": "milvus", "uri": uri, "alias": alias,
            "settings": {k: v for k, v in asdict(settings).items() if k != "uri"}}
    tmp = path / f".{POINTER_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path / POINTER_FILE)


# ----------------------------------------------------------------------------- names


def alias_for(path: str | Path, prefix: str) -> str:
    """The served name of a gallery saved to ``path`` for the first time: readable, and unique
    per location (galleries of two checkouts sharing one Milvus server never collide)."""
    resolved = Path(path).resolve()
    slug = re.sub(r"[^A-Za-z0-9_]", "_", resolved.name)[:40] or "gallery"
    return f"{prefix}_{slug}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"


def staging_name(prefix: str, resume_key: str | None = None) -> str:
    """A collection not yet published under any alias (a build in progress); named by
    ``resume_key`` when the build should be resumable, else unique."""
    if resume_key is not None and not re.fullmatch(r"[A-Za-z0-9_]{1,64}", resume_key):
        raise ValueError(f"resume_key must be 1-64 letters, digits or underscores, got {resume_key!r}")
    return f"{prefix}_staging_{resume_key or uuid.uuid4().hex[:12]}"


def version_number(collection: str) -> int | None:
    match = _VERSION_RE.search(collection)
    return int(match.group(1)) if match else None


def versions_of(client, alias: str) -> dict[str, int]:
    """The alias's collections (``<alias>__vNNNNNN_xxxxxxxx``) and their numbers."""
    prefix = f"{alias}__v"
    return {name: number for name in client.list_collections()
            if name.startswith(prefix) and (number := version_number(name)) is not None}


def next_version_name(client, alias: str) -> str:
    number = max(versions_of(client, alias).values(), default=0) + 1
    return f"{alias}__v{number:06d}_{uuid.uuid4().hex[:8]}"


def resolve_alias(client, alias: str) -> str | None:
    """The collection ``alias`` points to, or None when there is no such alias."""
    # Listed first: describing a missing alias makes pymilvus log an error with a traceback.
    if alias not in client.list_aliases().get("aliases", []):
        return None
    return client.describe_alias(alias)["collection_name"]


# ----------------------------------------------------------------------------- switching


def switch_alias(client, alias: str, collection: str) -> str | None:
    """Point ``alias`` at ``collection`` in one call; returns the collection it pointed to before."""
    previous = resolve_alias(client, alias)
    if previous is None:
        client.create_alias(collection, alias)
    elif previous != collection:
        client.alter_alias(collection, alias)
    logger.info("alias %s: %s -> %s", alias, previous, collection)
    return previous


def prune(client, alias: str, keep_versions: int) -> list[str]:
    """Drop the alias's old collections, keeping the newest ``keep_versions`` and the live one
    (a reader that resolved the alias just before the switch gets one switch's grace)."""
    live = resolve_alias(client, alias)
    numbered = sorted(versions_of(client, alias).items(), key=lambda item: item[1], reverse=True)
    keep = {name for name, _ in numbered[:keep_versions]} | {live}
    dropped = []
    for name, _ in numbered:
        if name not in keep:
            client.drop_collection(name)
            dropped.append(name)
    if dropped:
        logger.info("alias %s: dropped old collection(s) %s", alias, dropped)
    return dropped


def read_meta(client, collection: str) -> dict[str, Any]:
    properties = client.describe_collection(collection).get("properties", {})
    if META_PROPERTY not in properties:
        raise ValueError(f"Milvus collection {collection} is not a visrec gallery (no {META_PROPERTY} property)")
    return json.loads(properties[META_PROPERTY])


def write_meta(client, collection: str, meta: dict[str, Any]) -> None:
    try:
        text = json.dumps(meta, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"gallery.meta_extra must be JSON-serialisable: {exc}") from None
    client.alter_collection_properties(collection, properties={META_PROPERTY: text})
