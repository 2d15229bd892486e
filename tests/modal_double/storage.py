"""The double's storage RPCs: Dict entries, and Volume files (written by the client's v1
upload, read back by the client over HTTP from the block URLs the double hands out)."""

from __future__ import annotations

import hashlib

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from grpclib.server import Stream
from modal.volume import BLOCK_SIZE
from modal_proto import api_pb2

from tests.modal_double.state import Named


class StorageRpcs:
    """Mixed into the servicer, whose state it shares."""

    dicts: dict[tuple[str, str], Named]
    volumes: dict[tuple[str, str], Named]
    files: dict[str, bytes]  # uploaded through MountPutFile, by sha256
    blocks: dict[str, bytes]  # served over HTTP at block_url + sha256
    block_url: str

    # Dict entries: keys and values are the client's serialized bytes, compared as bytes.

    def _dict(self, dict_id: str) -> Named:
        return _by_id(self.dicts, dict_id, "dict")

    async def DictUpdate(self, stream: Stream) -> None:
        request = await stream.recv_message()
        data = self._dict(request.dict_id).data
        # With if_not_exists the update is all or nothing: one existing key writes none.
        created = not (request.if_not_exists and any(e.key in data for e in request.updates))
        if created:
            data.update({entry.key: entry.value for entry in request.updates})
        await stream.send_message(api_pb2.DictUpdateResponse(created=created))

    async def DictGet(self, stream: Stream) -> None:
        request = await stream.recv_message()
        data = self._dict(request.dict_id).data
        found = request.key in data
        await stream.send_message(
            api_pb2.DictGetResponse(found=found, value=data.get(request.key, b""))
        )

    async def DictPop(self, stream: Stream) -> None:
        request = await stream.recv_message()
        data = self._dict(request.dict_id).data
        found = request.key in data
        value = data.pop(request.key, b"")
        await stream.send_message(api_pb2.DictPopResponse(found=found, value=value))

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

    async def VolumeGetFile2(self, stream: Stream) -> None:
        request = await stream.recv_message()
        volume = self._volume(request.volume_id)
        path = request.path.lstrip("/")
        if path not in volume.files:
            raise GRPCError(Status.NOT_FOUND, f"No such file: {request.path}")
        content = volume.files[path]
        start = min(request.start, len(content))
        end = len(content) if not request.len else min(start + request.len, len(content))
        # One URL per BLOCK_SIZE-aligned block of the range, serving that block's part of it.
        urls = []
        for block_start in range(start - start % BLOCK_SIZE, end, BLOCK_SIZE):
            part = content[max(start, block_start) : min(end, block_start + BLOCK_SIZE)]
            digest = hashlib.sha256(part).hexdigest()
            self.blocks[digest] = part
            urls.append(self.block_url + digest)
        await stream.send_message(api_pb2.VolumeGetFile2Response(
            get_urls=urls, size=len(content), start=start, len=end - start
        ))  # fmt: skip


def _by_id(objects: dict[tuple[str, str], Named], object_id: str, kind: str) -> Named:
    """A named object by the id the client got for it; NOT_FOUND as Modal answers."""
    for named in objects.values():
        if named.object_id == object_id:
            return named
    raise GRPCError(Status.NOT_FOUND, f"no {kind} {object_id!r}")
