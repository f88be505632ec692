"""One sealed backup file (a generation): writing and reading its format, and the manifest of a
deduplicated one; never chooses which generations exist, never opens the store.

File format, versions 1 (the whole snapshot) and 2 (a manifest)::

    header   44 bytes: magic "CMCD-BAK", version (1 or 2), compression (1 = zlib), log2 of the segment size,
             a zero byte, creation time (microseconds, big-endian), key id (8 bytes), salt (16 bytes)
    segments the compressed snapshot (v1) or manifest (v2) cut into segments of 2**n bytes, the last one shorter (maybe empty),
             each AES-256-GCM sealed (16-byte tag) with the header as associated data

Each file has its own key, HKDF-SHA256(backup key, salt); segment i is sealed under the nonce
i (11 bytes, big-endian) + 1 if it is the last segment else 0. So a changed header or segment fails
authentication, and so do segments swapped, dropped, or cut off at the end (the last segment left
would not be marked last). Nothing decrypted is used before the whole file has authenticated.

Manifest (v2, the plaintext of the segments): the line "cmcd-manifest-v2", a line of JSON ({"db_bytes",
"chunk_bytes", "chunks", "indexes"}), then the chunk ids, 16 bytes each.
"""

from __future__ import annotations

import hmac
import io
import json
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cmcd.errors import BackupError
from cmcd.store import backup_chunks as chunks
from cmcd.store.backup_key import BackupKey

MAGIC = b"CMCD-BAK"
#: the version take_backup writes (2: a manifest of deduplicated chunks); version 1 files are still read
FORMAT_VERSION = 2
_VERSIONS = (1, 2)
_MANIFEST_MAGIC = b"cmcd-manifest-v2\n"
_ZLIB = 1
#: zlib level 3: half the time of the default 6 on a store, 1-2% larger (encrypted addresses do not compress)
_ZLIB_LEVEL = 3
_HEADER = struct.Struct(">8sBBBBQ8s16s")
HEADER_BYTES = _HEADER.size
_TAG_BYTES = 16
#: compressed bytes per sealed segment (1 MiB); a reader accepts 4 KiB to 16 MiB
SEGMENT_BYTES = 1 << 20
SEGMENT_LOG2 = range(12, 25)


@dataclass(frozen=True)
class Manifest:
    db_bytes: int
    indexes: list[str]
    ids: list[bytes]


@dataclass(frozen=True)
class Header:
    raw: bytes
    version: int
    created: float
    segment_bytes: int
    key_id: bytes
    salt: bytes


def seal(src: BinaryIO, out: BinaryIO, key: BackupKey, created: float, segment_bytes: int, version: int) -> None:
    """Write into OUT a header of format VERSION, then SRC compressed and sealed in segments of segment_bytes."""
    salt = os.urandom(16)
    created_us = max(0, round(created * 1_000_000))
    log2 = segment_bytes.bit_length() - 1
    header = _HEADER.pack(MAGIC, version, _ZLIB, log2, 0, created_us, key.key_id, salt)
    aead = key.file_aead(salt)
    out.write(header)
    compressor = zlib.compressobj(_ZLIB_LEVEL)
    pending = bytearray()
    index = 0

    def emit(final: bool) -> None:
        nonlocal index
        while len(pending) >= segment_bytes:
            out.write(aead.encrypt(_nonce(index, False), bytes(pending[:segment_bytes]), header))
            del pending[:segment_bytes]
            index += 1
        if final:  # shorter than a segment (maybe empty): that is how a reader knows it is the last
            out.write(aead.encrypt(_nonce(index, True), bytes(pending), header))

    while block := src.read(4 * SEGMENT_BYTES):
        pending += compressor.compress(block)
        emit(False)
    pending += compressor.flush()
    emit(True)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


def _read_header(file: Path, raw: bytes, key: BackupKey) -> Header:
    if not raw:
        raise BackupError(f"{file}: empty file, not a backup (truncated to nothing?); it is refused")
    if len(raw) < HEADER_BYTES:
        if raw.startswith(MAGIC) or MAGIC.startswith(raw):
            raise BackupError(f"{file}: truncated: {len(raw)} bytes, shorter than a backup header; it is refused")
        raise BackupError(f"{file}: not a cmcd store backup (no {MAGIC.decode()} header)")
    magic, version, compression, log2, zero, created_us, key_id, salt = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise BackupError(f"{file}: not a cmcd store backup (no {MAGIC.decode()} header)")
    if version not in _VERSIONS:
        raise BackupError(
            f"{file}: backup format version {version}; this cmcd reads versions {_VERSIONS[0]} to {_VERSIONS[-1]} "
            "(written by a newer cmcd, or altered)"
        )
    if compression != _ZLIB or log2 not in SEGMENT_LOG2 or zero != 0:
        raise BackupError(f"{file}: the backup header is damaged or altered; it is refused")
    if not hmac.compare_digest(key_id, key.key_id):
        raise BackupError(
            f"{file}: written with another backup key (key id {key_id.hex()}); backup.key_file has key id "
            f"{key.key_id.hex()}"
        )
    return Header(
        raw=raw, version=version, created=created_us / 1_000_000, segment_bytes=1 << log2, key_id=key_id, salt=salt
    )


def _unseal(file: Path, key: BackupKey, out: BinaryIO) -> Header:
    """Authenticate, decrypt and decompress FILE into OUT; raise BackupError at the first thing wrong."""
    try:
        f = file.open("rb")
    except OSError as exc:
        raise BackupError(f"{file}: cannot read the backup: {exc.strerror or exc}") from None
    with f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BackupError(f"{file}: not a regular file")
        header = _read_header(file, f.read(HEADER_BYTES), key)
        aead = key.file_aead(header.salt)
        sealed_bytes = header.segment_bytes + _TAG_BYTES
        inflate = zlib.decompressobj()
        index, offset = 0, HEADER_BYTES
        chunk = f.read(sealed_bytes)
        while True:
            following = b"" if len(chunk) < sealed_bytes else f.read(sealed_bytes)
            final = not following
            try:
                if len(chunk) < _TAG_BYTES:
                    raise InvalidTag
                plain = aead.decrypt(_nonce(index, final), chunk, header.raw)
            except InvalidTag:
                # a valid file always ends in a sealed last segment (at least its tag), never at a segment boundary
                if not chunk or (len(chunk) == sealed_bytes and _opens(aead, index, chunk, header.raw)):
                    raise BackupError(
                        f"{file}: truncated: it ends at byte {offset + len(chunk)}, before its last segment; "
                        "it is refused"
                    ) from None
                raise BackupError(
                    f"{file}: fails authentication (segment {index} at byte {offset}): the file was altered, "
                    "damaged or cut short; it is refused"
                ) from None
            _inflate(file, inflate, plain, out)
            if final:
                break
            index, offset, chunk = index + 1, offset + len(chunk), following
        try:
            out.write(inflate.flush())
            complete = inflate.eof and not inflate.unused_data
        except zlib.error:
            complete = False
        if not complete:
            raise BackupError(f"{file}: authenticated, but its compressed data is incomplete; it is refused")
    return header


def _peek_version(file: Path) -> int | None:
    """The format version byte of FILE's header, if it has one (_unseal says what is wrong otherwise)."""
    try:
        with file.open("rb") as f:
            raw = f.read(len(MAGIC) + 1)
    except OSError:
        return None
    return raw[len(MAGIC)] if len(raw) > len(MAGIC) and raw.startswith(MAGIC) else None


def pack_manifest(db_bytes: int, indexes: list[str], ids: list[bytes]) -> bytes:
    """The plaintext of a version 2 generation: the snapshot's size, its chunk ids and INDEXES."""
    head = {"db_bytes": db_bytes, "chunk_bytes": chunks.CHUNK_BYTES, "chunks": len(ids), "indexes": indexes}
    return _MANIFEST_MAGIC + json.dumps(head).encode() + b"\n" + b"".join(ids)


def read_manifest(file: Path, key: BackupKey) -> Manifest | None:
    """The manifest in FILE, authenticated; None for a version 1 file (the whole snapshot, no chunks)."""
    if _peek_version(file) == 1:
        return None
    buf = io.BytesIO()
    header = _unseal(file, key, buf)
    if header.version == 1:
        return None
    data = buf.getvalue()
    try:
        if not data.startswith(_MANIFEST_MAGIC):
            raise ValueError
        line, _, ids = data[len(_MANIFEST_MAGIC) :].partition(b"\n")
        head = json.loads(line)
        n, db_bytes, indexes = int(head["chunks"]), int(head["db_bytes"]), head["indexes"]
        if len(ids) != n * chunks.ID_BYTES or head["chunk_bytes"] != chunks.CHUNK_BYTES:
            raise ValueError
        if not isinstance(indexes, list) or not all(isinstance(x, str) for x in indexes):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise BackupError(
            f"{file}: authenticated, but its manifest is not one this cmcd reads; it is refused"
        ) from None
    step = chunks.ID_BYTES
    return Manifest(db_bytes, indexes, [ids[i : i + step] for i in range(0, len(ids), step)])


def unseal_store(file: Path, key: BackupKey, out: BinaryIO) -> tuple[Header, list[str]]:
    """Write the store of generation FILE, either format, into OUT; return its header and the CREATE INDEX
    statements still to run on it (none for version 1). Every chunk must authenticate and hash right."""
    if _peek_version(file) != 2:
        return _unseal(file, key, out), []
    buf = io.BytesIO()
    header = _unseal(file, key, buf)
    manifest = read_manifest(file, key)
    assert manifest is not None
    ck = chunks.ChunkKeys.derive(key.key)
    written = 0
    for i, cid in enumerate(manifest.ids):
        plain = chunks.read_chunk(file.parent, ck, cid, file, i)
        out.write(plain)
        written += len(plain)
    if written != manifest.db_bytes:
        raise BackupError(f"{file}: its chunks hold {written} bytes, its manifest says {manifest.db_bytes}; refused")
    return header, manifest.indexes


def _opens(aead: AESGCM, index: int, chunk: bytes, aad: bytes) -> bool:
    """Whether CHUNK is a whole segment that is not the last (so the file was cut after it)."""
    try:
        aead.decrypt(_nonce(index, False), chunk, aad)
    except InvalidTag:
        return False
    return True


def _inflate(file: Path, inflate: zlib._Decompress, data: bytes, out: BinaryIO) -> None:
    """Decompress DATA into OUT at most 16 MiB at a time."""
    try:
        while data:
            out.write(inflate.decompress(data, 16 << 20))
            data = inflate.unconsumed_tail
    except zlib.error as exc:
        raise BackupError(f"{file}: authenticated, but its compressed data is damaged ({exc}); it is refused") from None
