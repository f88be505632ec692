"""Encrypted, deduplicated chunks of store snapshots: cut, seal, keep once by keyed hash, read back, collect
unreferenced ones; never parses SQLite and never decides which generations are kept (cmcd.store.backup does).

A chunk is CHUNK_BYTES (64 KiB: 16 pages of 4 KiB) of a snapshot at a fixed, page-aligned offset; the last
one may be shorter. Its id is HMAC-SHA256(id key, plaintext) cut to 16 bytes, the id key derived from the
backup key: equal chunks are kept once, and an id tells nothing of the content to whoever lacks the key.
SQLite appends new rows at the end of a table, so most chunks of one hour's snapshot are the chunks of the
hour before, and only new or changed ones are written.

Chunk file backup.dir/chunks/ab/<32 hex digits of the id>::

    magic "CMCDCHK1", a random 12-byte nonce, then zlib(plaintext) sealed with AES-256-GCM under a key
    derived from the backup key, with the magic and the id as associated data

A chunk read back must authenticate, decompress and hash to its id, so a chunk swapped for another,
altered or cut is refused by name. Everything here blocks.
"""

from __future__ import annotations

import hmac
import logging
import os
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cmcd.errors import BackupError
from cmcd.store.backup_fs import fsync_dir

log = logging.getLogger("cmcd.backup")

#: bytes of a snapshot per chunk: 16 SQLite pages of 4 KiB, so chunk boundaries are page boundaries
CHUNK_BYTES = 1 << 16
ID_BYTES = 16
CHUNK_DIR = "chunks"
_MAGIC = b"CMCDCHK1"
_NONCE_BYTES = 12
_ZLIB_LEVEL = 3


@dataclass(frozen=True)
class ChunkKeys:
    """The two keys derived from the backup key for chunks: one names them, one seals them."""

    id_key: bytes = field(repr=False)
    seal_key: bytes = field(repr=False)

    @classmethod
    def derive(cls, backup_key: bytes) -> ChunkKeys:
        def hkdf(info: bytes) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(backup_key)

        return cls(hkdf(b"cmcd backup v2 chunk id"), hkdf(b"cmcd backup v2 chunk seal"))

    def chunk_id(self, plain: bytes) -> bytes:
        return hmac.digest(self.id_key, plain, "sha256")[:ID_BYTES]


def chunk_path(backup_dir: Path, cid: bytes) -> Path:
    h = cid.hex()
    return backup_dir / CHUNK_DIR / h[:2] / h


@dataclass(frozen=True)
class Stored:
    """The chunks of one snapshot: their ids in order, and how many bytes were newly written for them."""

    ids: list[bytes]
    new_chunks: int
    new_bytes: int


def store_chunks(src: BinaryIO, backup_dir: Path, keys: ChunkKeys, partial_prefix: str) -> Stored:
    """Cut SRC into chunks and write those not kept yet into BACKUP_DIR/chunks (each through a temporary file
    named PARTIAL_PREFIX... in BACKUP_DIR, fsynced and renamed); the directories are fsynced before returning."""
    ids: list[bytes] = []
    seen: set[bytes] = set()
    touched: set[Path] = set()
    new_chunks = new_bytes = 0
    aead = AESGCM(keys.seal_key)
    while block := src.read(CHUNK_BYTES):
        cid = keys.chunk_id(block)
        ids.append(cid)
        if cid in seen:
            continue
        seen.add(cid)
        path = chunk_path(backup_dir, cid)
        if path.exists():
            continue
        nonce = os.urandom(_NONCE_BYTES)
        data = _MAGIC + nonce + aead.encrypt(nonce, zlib.compress(block, _ZLIB_LEVEL), _MAGIC + cid)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=partial_prefix, suffix=".chunk", dir=backup_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        touched.add(path.parent)
        new_chunks += 1
        new_bytes += len(data)
    for directory in sorted(touched):
        fsync_dir(directory)
    if touched:
        fsync_dir(backup_dir / CHUNK_DIR)
    return Stored(ids, new_chunks, new_bytes)


def read_chunk(backup_dir: Path, keys: ChunkKeys, cid: bytes, manifest: Path, index: int) -> bytes:
    """The plaintext of chunk CID (chunk INDEX of MANIFEST); BackupError saying what is wrong otherwise."""
    path = chunk_path(backup_dir, cid)
    where = f"{manifest}: chunk {index} ({path})"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BackupError(
            f"{where} is missing; a generation needs the chunks/ directory next to it (copy backup.dir whole)"
        ) from None
    except OSError as exc:
        raise BackupError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    head = len(_MAGIC) + _NONCE_BYTES
    if len(data) < head + 16 or not data.startswith(_MAGIC):
        raise BackupError(f"{where} is damaged or cut short; the generation is refused")
    try:
        plain = zlib.decompress(AESGCM(keys.seal_key).decrypt(data[len(_MAGIC) : head], data[head:], _MAGIC + cid))
    except (InvalidTag, zlib.error):
        raise BackupError(
            f"{where} fails authentication: altered, damaged or cut short; the generation is refused"
        ) from None
    if not hmac.compare_digest(keys.chunk_id(plain), cid):
        raise BackupError(f"{where} does not hash to its id; the generation is refused")
    return plain


def chunks_on_disk(backup_dir: Path) -> set[bytes]:
    """The ids of every chunk file in BACKUP_DIR/chunks (names that are not ids are ignored)."""
    found: set[bytes] = set()
    root = backup_dir / CHUNK_DIR
    try:
        subdirs = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return found
    for sub in subdirs:
        for entry in os.scandir(sub.path):
            name = entry.name
            if len(name) == 2 * ID_BYTES and name.startswith(sub.name):
                try:
                    found.add(bytes.fromhex(name))
                except ValueError:
                    continue
    return found


def remove_chunks(backup_dir: Path, ids: Iterable[bytes], *, overwrite: bool) -> int:
    """Unlink the chunk files of IDS (with OVERWRITE, first overwrite them with zeros and fsync, for data
    that must be erased); return how many went."""
    removed = 0
    touched: set[Path] = set()
    for cid in ids:
        path = chunk_path(backup_dir, cid)
        try:
            if overwrite:
                with path.open("r+b") as f:
                    f.write(bytes(os.fstat(f.fileno()).st_size))
                    f.flush()
                    os.fsync(f.fileno())
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("event=backup_chunk_remove_failed file=%s error=%r", path, exc.strerror or str(exc))
            continue
        removed += 1
        touched.add(path.parent)
    for directory in touched:
        fsync_dir(directory)
    return removed
