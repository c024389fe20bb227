"""CRI ImageService: proto <-> criv.image domain, nothing else.

Requests are checked first (criv.cri.validate); errors propagate as CrivError and the
interceptor in criv.cri.wire maps them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc

from criv.cri.validate import validate_rpcs
from criv.image.manager import Credentials, ImageManager, StoredImage
from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc

_STREAM_BATCH = 100


def user_of(image_user: str) -> tuple[int | None, str]:
    """(uid, username) from the config's User, as the CRI spec says: a numeric user is
    the uid, anything else the username; a ``user:group`` keeps only the user."""
    user = image_user.split(":", 1)[0]
    if not user:
        return None, ""
    try:
        return int(user), ""
    except ValueError:
        return None, user


def to_proto(img: StoredImage) -> api_pb2.Image:
    uid, username = user_of(img.user)
    out = api_pb2.Image(
        id=img.id,
        repo_tags=img.repo_tags,
        repo_digests=img.repo_digests,
        size=img.size,
        username=username,
        spec=api_pb2.ImageSpec(image=img.id),
        pinned=img.pinned,
    )
    if uid is not None:
        out.uid.value = uid
    return out


def credentials(auth: api_pb2.AuthConfig) -> Credentials | None:
    c = Credentials(
        username=auth.username,
        password=auth.password,
        auth=auth.auth,
        server_address=auth.server_address,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )
    return None if c.is_empty() else c


class ImageService(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, images: ImageManager) -> None:
        self._images = images

    def _filtered(self, f: api_pb2.ImageFilter) -> list[api_pb2.Image]:
        ref = f.image.image if f.HasField("image") else ""
        return [to_proto(i) for i in self._images.list(ref or None)]

    async def ListImages(
        self, request: api_pb2.ListImagesRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListImagesResponse:
        return api_pb2.ListImagesResponse(images=self._filtered(request.filter))

    async def StreamImages(
        self, request: api_pb2.StreamImagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.StreamImagesResponse]:
        images = self._filtered(request.filter)
        for i in range(0, len(images), _STREAM_BATCH):
            yield api_pb2.StreamImagesResponse(images=images[i : i + _STREAM_BATCH])

    async def ImageStatus(
        self, request: api_pb2.ImageStatusRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ImageStatusResponse:
        img = self._images.status(request.image.image)
        if img is None:
            return api_pb2.ImageStatusResponse()  # unknown image: empty, no error
        resp = api_pb2.ImageStatusResponse(image=to_proto(img))
        if request.verbose:
            info = {
                "id": img.id,
                "imageSpec": img.config,
                "layers": img.layers,
                "layerDirs": [str(p) for p in img.layer_dirs],
                "pinned": img.pinned,
            }
            resp.info["info"] = json.dumps(info)
        return resp

    async def PullImage(
        self, request: api_pb2.PullImageRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.PullImageResponse:
        creds = credentials(request.auth) if request.HasField("auth") else None
        image_ref = await self._images.pull(request.image.image, creds)
        return api_pb2.PullImageResponse(image_ref=image_ref)

    async def RemoveImage(
        self, request: api_pb2.RemoveImageRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RemoveImageResponse:
        await self._images.remove(request.image.image)
        return api_pb2.RemoveImageResponse()

    async def ImageFsInfo(
        self, request: api_pb2.ImageFsInfoRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ImageFsInfoResponse:
        u = self._images.fs_info()
        usage = api_pb2.FilesystemUsage(
            timestamp=u.timestamp_ns,
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=u.mountpoint),
            used_bytes=api_pb2.UInt64Value(value=u.used_bytes),
            inodes_used=api_pb2.UInt64Value(value=u.inodes_used),
        )
        return api_pb2.ImageFsInfoResponse(image_filesystems=[usage])


validate_rpcs(ImageService, "ImageService")
