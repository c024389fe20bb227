"""Image volumes (``Mount.image``, KEP 4639) on the wire: the request's checks, the
record's fields, the status's ``Mount.image``, and the config the agent gets.

kubelet pulls the image and names it in ``Mount.image.image`` (``host_path`` empty);
criv mounts it read-only (:mod:`criv.sandbox.imagevol`), whatever ``readonly`` says.
"""

from __future__ import annotations

from criv.cri.validate_linux import fail
from criv.sandbox.records import MountRecord
from criv.sandbox.subpath import sub_path_problem
from criv_agent.api.runtime.v1 import api_pb2


def check_image_mount(m: api_pb2.Mount, path: str) -> None:
    """``host_path`` empty (they are exclusive), ``image_sub_path`` relative and not
    climbing out of the image (what it resolves to is checked at create time)."""
    if m.host_path:
        raise fail(f"{path}.host_path", "must be empty for an image volume")
    if problem := sub_path_problem(m.image_sub_path):
        raise fail(f"{path}.image_sub_path", problem)


def image_fields(m: api_pb2.Mount) -> dict[str, str]:
    """The record's image volume fields of a requested mount ({} for a host path)."""
    if not m.image.image:
        return {}
    return {"image": m.image.image, "image_sub_path": m.image_sub_path}


def for_agent(cfg: api_pb2.ContainerConfig) -> bytes:
    """``cfg`` serialized for the agent: image volumes read-only and private (the agent
    binds the host's read-only tree criv made, as any volume)."""
    if not any(m.image.image for m in cfg.mounts):
        return cfg.SerializeToString()
    out = api_pb2.ContainerConfig()
    out.CopyFrom(cfg)
    for m in out.mounts:
        if m.image.image:
            m.readonly = True
            m.propagation = api_pb2.PROPAGATION_PRIVATE
    return out.SerializeToString()


def status_image(m: MountRecord) -> api_pb2.ImageSpec | None:
    """``Mount.image`` in ContainerStatus: the image as requested, and the digested
    reference it resolved to (``image_ref``, as the container's own ``image_ref``)."""
    if not m.image:
        return None
    return api_pb2.ImageSpec(image=m.image, image_ref=m.image_ref or m.image_id)
