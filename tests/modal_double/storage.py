"""The double's storage RPCs: Dict entries, which expire after DICT_ENTRY_IDLE_SECONDS without
a read or a write as Modal's do (the double's clock can be moved on), and Volume files: written
by the client's v1 upload (MountPutFile + VolumePutFiles) or v2 upload (VolumePutFiles2, the
missing blocks PUT over HTTP to the URLs the double hands out), read back by the client over
HTTP from the block URLs of VolumeGetFile2."""

from __future__ import annotations

import hashlib
import time

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from grpclib.server import Stream
from modal.volume import BLOCK_SIZE
from modal_proto import api_pb2

from tests.modal_double.state import Named

DAYS = 24 * 60 * 60
DICT_ENTRY_IDLE_SECONDS = 7 * DAYS


class StorageRpcs:
    """Mixed into the servicer, whose state it shares."""

    dicts: dict[tuple[str, str], Named]
    volumes: dict[tuple[str, str], Named]
    files: dict[str, bytes]  # uploaded through MountPutFile, by sha256
    blocks: dict[str, bytes]  # PUT by v2 uploads, served at block_url + sha256 (hex)
    block_url: str

    def __init__(self) -> None:
        super().__init__()
        self.clock_offset = 0.0
        # When each Dict entry was last read or written, by (dict id, key), on the double's clock.
        self.dict_touched: dict[tuple[str, bytes], float] = {}

    # The clock Dict entries expire by.

    def now(self) -> float:
        return time.time() + self.clock_offset

    def advance_clock(self, seconds: float) -> None:
        """Time passes for Modal: entries idle longer than DICT_ENTRY_IDLE_SECONDS vanish."""
        self.clock_offset += seconds
        for named in self.dicts.values():
            self._expire(named)

    def _expire(self, named: Named) -> None:
        now = self.now()
        for key in list(named.data):
            touched = self.dict_touched.setdefault((named.object_id, key), now)
            if now - touched > DICT_ENTRY_IDLE_SECONDS:
                del named.data[key]
                del self.dict_touched[(named.object_id, key)]

    def _touch(self, named: Named, key: bytes) -> None:
        self.dict_touched[(named.object_id, key)] = self.now()

    # Dict entries: keys and values are the client's serialized bytes, compared as bytes.

    def _dict(self, dict_id: str) -> Named:
        named = _by_id(self.dicts, dict_id, "dict")
        self._expire(named)
        return named

    async def DictUpdate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        named = self._dict(request.dict_id)
        # With if_not_exists the update is all or nothing: one existing key writes none.
        created = not (request.if_not_exists and any(e.key in named.data for e in request.updates))
        if created:
            for entry in request.updates:
                named.data[entry.key] = entry.value
                self._touch(named, entry.key)
        await stream.send_message(api_pb2.DictUpdateResponse(created=created))

    async def DictGet(self, stream: Stream) -> None:
        request = await stream.recv_message()
        named = self._dict(request.dict_id)
        found = request.key in named.data
        if found:
            self._touch(named, request.key)
        await stream.send_message(
            api_pb2.DictGetResponse(found=found, value=named.data.get(request.key, b""))
        )

    async def DictPop(self, stream: Stream) -> None:
        request = await stream.recv_message()
        named = self._dict(request.dict_id)
        found = request.key in named.data
        value = named.data.pop(request.key, b"")
        self.dict_touched.pop((named.object_id, request.key), None)
        await stream.send_message(api_pb2.DictPopResponse(found=found, value=value))

    async def DictContents(self, stream: Stream) -> None:
        request = await stream.recv_message()
        named = self._dict(request.dict_id)
        for key, value in list(named.data.items()):
            await stream.send_message(api_pb2.DictEntry(key=key if request.keys else b"",
                                                        value=value if request.values else b""))

    # Volume files.

    def _volume(self, volume_id: str) -> Named:
        return _by_id(self.volumes, volume_id, "volume")

    async def VolumePutFiles(self, stream: Stream) -> None:
        request = await stream.recv_message()
        volume = self._volume(request.volume_id)
        if volume.version == api_pb2.VOLUME_FS_VERSION_V2:
            raise GRPCError(Status.INVALID_ARGUMENT, "VolumePutFiles: a v2 volume takes PutFiles2")
        paths = {f.filename.lstrip("/"): f.sha256_hex for f in request.files}
        missing = [path for path, digest in paths.items() if digest not in self.files]
        if missing:
            raise GRPCError(Status.FAILED_PRECONDITION, f"VolumePutFiles: not uploaded {missing}")
        existing = [path for path in paths if path in volume.files]
        if request.disallow_overwrite_existing_files and existing:
            raise GRPCError(Status.ALREADY_EXISTS, f"VolumePutFiles: {existing} exist")
        volume.files.update({path: self.files[digest] for path, digest in paths.items()})
        await stream.send_message(empty_pb2.Empty())

    async def VolumePutFiles2(self, stream: Stream) -> None:
        """All files or none, each whole: the blocks the volume lacks are answered as missing
        (with a PUT URL each); a request naming every block by its PUT receipt, or by what the
        file at that path already holds, writes the files in one step."""
        request = await stream.recv_message()
        volume = self._volume(request.volume_id)
        if volume.version != api_pb2.VOLUME_FS_VERSION_V2:
            raise GRPCError(Status.INVALID_ARGUMENT, "VolumePutFiles2: a v1 volume takes PutFiles")
        paths = [file.path.lstrip("/") for file in request.files]
        existing = [path for path in paths if path in volume.files]
        if request.disallow_overwrite_existing_files and existing:
            raise GRPCError(Status.ALREADY_EXISTS, f"VolumePutFiles2: {existing} exist")
        missing = [
            api_pb2.VolumePutFiles2Response.MissingBlock(
                file_index=file_index, block_index=block_index,
                put_url=self.block_url + block.contents_sha256.hex(),
            )
            for file_index, file in enumerate(request.files)
            for block_index, block in enumerate(file.blocks)
            if not self._block_present(volume, file.path, block_index, block)
        ]  # fmt: skip
        if not missing:
            files = zip(paths, request.files, strict=True)
            volume.files.update({path: self._assemble(file) for path, file in files})
        await stream.send_message(api_pb2.VolumePutFiles2Response(missing_blocks=missing))

    def put_block(self, digest: str, data: bytes) -> bytes | None:
        """An HTTP PUT of a block to its URL: stored if it is what the URL names; the receipt
        the client hands back in its next VolumePutFiles2, or None for a corrupt block."""
        if hashlib.sha256(data).hexdigest() != digest:
            return None
        self.blocks[digest] = data
        return _receipt(digest)

    def _block_present(
        self, volume: Named, path: str, index: int, block: api_pb2.VolumePutFiles2Request.Block
    ) -> bool:
        digest = block.contents_sha256.hex()
        if block.HasField("put_response"):
            if block.put_response != _receipt(digest) or digest not in self.blocks:
                raise GRPCError(Status.INVALID_ARGUMENT, "VolumePutFiles2: a bad put_response")
            return True
        current = volume.files.get(path.lstrip("/"))
        held = None if current is None else _block(current, index)
        if held is None or hashlib.sha256(held).hexdigest() != digest:
            return False
        self.blocks[digest] = held
        return True

    def _assemble(self, file: api_pb2.VolumePutFiles2Request.File) -> bytes:
        # The client leaves the trailing zero bytes out of each block.
        parts = []
        for index, block in enumerate(file.blocks):
            length = min(BLOCK_SIZE, file.size - index * BLOCK_SIZE)
            parts.append(self.blocks[block.contents_sha256.hex()].ljust(length, b"\0"))
        content = b"".join(parts)
        if len(content) != file.size:
            raise GRPCError(Status.INVALID_ARGUMENT, f"VolumePutFiles2: {file.path} is not whole")
        return content

    async def VolumeGetFile2(self, stream: Stream) -> None:
        request = await stream.recv_message()
        volume = self._volume(request.volume_id)
        path = request.path.lstrip("/")
        if path not in volume.files:
            raise GRPCError(Status.NOT_FOUND, f"No such file: {request.path}")
        content = volume.files[path]
        start = min(request.start, len(content))
        end = len(content) if not request.len else min(start + request.len, len(content))
        # One URL per BLOCK_SIZE-aligned block of the range, serving that block's part of it
        # (without its trailing zero bytes when the client pads them back).
        urls = []
        for block_start in range(start - start % BLOCK_SIZE, end, BLOCK_SIZE):
            part = content[max(start, block_start) : min(end, block_start + BLOCK_SIZE)]
            if request.client_pads_blocks:
                part = part.rstrip(b"\0")
            digest = hashlib.sha256(part).hexdigest()
            self.blocks[digest] = part
            urls.append(self.block_url + digest)
        await stream.send_message(api_pb2.VolumeGetFile2Response(
            get_urls=urls, size=len(content), start=start, len=end - start
        ))  # fmt: skip


def _receipt(digest: str) -> bytes:
    return f"stored {digest}".encode()


def _block(content: bytes, index: int) -> bytes:
    """Block `index` of `content` as the client hashes it: without trailing zero bytes."""
    return content[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE].rstrip(b"\0")


def _by_id(objects: dict[tuple[str, str], Named], object_id: str, kind: str) -> Named:
    """A named object by the id the client got for it; NOT_FOUND as Modal answers."""
    for named in objects.values():
        if named.object_id == object_id:
            return named
    raise GRPCError(Status.NOT_FOUND, f"no {kind} {object_id!r}")
