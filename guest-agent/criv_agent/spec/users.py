"""User and group resolution against the container's /etc/passwd and /etc/group, with
containerd's semantics (``oci.WithUser``, ``WithAdditionalGIDs``, CVE-2023-25173 fix:
the primary gid is the first additional gid)."""

from __future__ import annotations

from dataclasses import dataclass

from criv_agent.errors import InvalidArgument
from criv_agent.spec.rootfs import read_rootfs_file


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def parse_passwd(text: str | None) -> list[PasswdEntry]:
    out: list[PasswdEntry] = []
    for line in (text or "").splitlines():
        f = line.split(":")
        if len(f) < 4 or line.startswith("#"):
            continue
        try:
            out.append(PasswdEntry(f[0], int(f[2]), int(f[3]), f[5] if len(f) > 5 else ""))
        except ValueError:
            continue
    return out


def parse_group(text: str | None) -> list[GroupEntry]:
    out: list[GroupEntry] = []
    for line in (text or "").splitlines():
        f = line.split(":")
        if len(f) < 3 or line.startswith("#"):
            continue
        try:
            members = tuple(m for m in f[3].split(",") if m) if len(f) > 3 else ()
            out.append(GroupEntry(f[0], int(f[2]), members))
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    home: str


class UserDb:
    """passwd/group of one rootfs, read once."""

    def __init__(self, passwd: list[PasswdEntry], group: list[GroupEntry]) -> None:
        self.passwd = passwd
        self.group = group

    @classmethod
    def from_rootfs(cls, rootfs: str) -> UserDb:
        return cls(
            parse_passwd(read_rootfs_file(rootfs, "/etc/passwd")),
            parse_group(read_rootfs_file(rootfs, "/etc/group")),
        )

    def by_name(self, name: str) -> PasswdEntry | None:
        return next((p for p in self.passwd if p.name == name), None)

    def by_uid(self, uid: int) -> PasswdEntry | None:
        return next((p for p in self.passwd if p.uid == uid), None)

    def group_gid(self, name: str) -> int | None:
        return next((g.gid for g in self.group if g.name == name), None)

    def resolve(self, userstr: str, supplemental: list[int], strict: bool = False) -> ResolvedUser:
        """``user[:group]`` where each part is a name or a number. ``strict`` (CRI
        SupplementalGroupsPolicy Strict): the image's /etc/group adds no groups, only
        the primary gid and ``supplemental`` remain."""
        user, _, group = userstr.partition(":")
        entry: PasswdEntry | None
        if user == "":
            user = "0"
        if user.isdigit():
            uid = int(user)
            entry = self.by_uid(uid)
            gid = entry.gid if entry else 0
        else:
            entry = self.by_name(user)
            if entry is None:
                raise InvalidArgument(f"no such user {user!r} in the image's /etc/passwd")
            uid, gid = entry.uid, entry.gid
        if group:
            if group.isdigit():
                gid = int(group)
            else:
                found = self.group_gid(group)
                if found is None:
                    raise InvalidArgument(f"no such group {group!r} in the image's /etc/group")
                gid = found
        extra: list[int] = [gid]
        if entry is not None and not strict:
            # groups listing the user as a member, except its own-named group
            extra += [g.gid for g in self.group if entry.name in g.members and g.name != entry.name]
        extra += supplemental
        gids: list[int] = []
        for g in extra:
            if g not in gids:
                gids.append(g)
        return ResolvedUser(uid, gid, tuple(gids), entry.home if entry else "/")
