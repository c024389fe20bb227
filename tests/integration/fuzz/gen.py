"""Seeded CRI request generator for the fuzz test (tests/integration/fuzz).

A request is either built from its message descriptor (every field random, boundary or
junk) or a valid template with a few fields mutated; ids of real pods and containers
are mixed in. ``Harmless.sanitize`` (harmless.py) then keeps the rare request that
could succeed harmless to the machine the test runs on.

Request ``i`` of seed ``s`` comes from its own ``random.Random(f"{s}:{i}")``, so it does
not depend on the answers to earlier requests (only the ids mixed in do).
"""

from __future__ import annotations

import random
import string

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from criv_agent.api.runtime.v1 import api_pb2
from tests.integration.fuzz.harmless import (
    ID_FIELDS,
    READ_ONLY,
    SAFE_COMMANDS,
    TERM_TRAP,
    Harmless,
    Pools,
)

F = FieldDescriptor
MAX_DEPTH = 4
# A request this big is regenerated smaller: the point is many requests, and the
# daemon's 16 MiB limit is gRPC's, not criv's.
MAX_REQUEST_BYTES = 3 * 1024 * 1024
RAW_SHARE = 0.03  # of requests sent as bytes that do not parse

JUNK = [
    "", " ", "\x00", "a\x00b", "/tmp/\x00x", ".", "..", "/", "//", "../../../../etc/passwd",
    "/etc/passwd", "a/../../b", "-", "--help", "a b", "\n", "x\ny", "\t", "\r\n", "é",
    "日本語", "\u202e", "\ufeff", "\x7f", "$(id)", "%s%n%x", "*", "?", "\\", "'", '"', "{}",
    "null", "0", "-1", "65536", ":", "@", "sha256:", "sha256:" + "0" * 64, "0" * 64,
    "a" * 63, "a" * 64, "a" * 65, "A" * 300, "UPPER", "a.b.c", "a..b", "-a-", "a_b",
    "localhost:1/x", "127.0.0.1:1/nope/nope:1", "x" * 5000, "a/b/c", "\x00" * 100,
]  # fmt: skip
INT_BOUNDS = {
    F.TYPE_INT32: [0, 1, -1, 2**31 - 1, -(2**31), 80, 65535, 65536],
    F.TYPE_SINT32: [0, 1, -1, 2**31 - 1, -(2**31)],
    F.TYPE_SFIXED32: [0, -1, 2**31 - 1, -(2**31)],
    F.TYPE_INT64: [0, 1, -1, 2**63 - 1, -(2**63), 2**31, 10**18, 3600, 30],
    F.TYPE_SINT64: [0, 1, -1, 2**63 - 1, -(2**63)],
    F.TYPE_SFIXED64: [0, -1, 2**63 - 1, -(2**63)],
    F.TYPE_UINT32: [0, 1, 2**32 - 1, 2**31, 65535],
    F.TYPE_FIXED32: [0, 1, 2**32 - 1],
    F.TYPE_UINT64: [0, 1, 2**64 - 1, 2**63, 4096],
    F.TYPE_FIXED64: [0, 1, 2**64 - 1],
}
INT_RANGE = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def unary_rpcs() -> list[tuple[str, str, type[Message]]]:
    """(service, method, request class) of every unary RPC of both CRI services."""
    out = []
    for svc in ("RuntimeService", "ImageService"):
        for m in api_pb2.DESCRIPTOR.services_by_name[svc].methods:
            if not (m.client_streaming or m.server_streaming):
                out.append((svc, m.name, getattr(api_pb2, m.input_type.name)))
    return out


class Generator:
    def __init__(self, seed: int, pools: Pools) -> None:
        self.seed = seed
        self.pools = pools
        self.harmless = Harmless(pools)

    # -- values ---------------------------------------------------------------------

    def string(self, rng: random.Random, small: bool = False) -> str:
        """Junk, random text, a real id, or (rarely, unless ``small``) a huge string."""
        r = rng.random()
        if r < 0.5:
            s = rng.choice(JUNK)
            return s[:300] if small else s
        if r < 0.75:
            n = rng.choice([1, 2, 8, 64, 300])
            return "".join(rng.choice(string.printable) for _ in range(n))
        if r < 0.85:
            return "".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(rng.randrange(1, 40)))
        if r < 0.97 or small:
            return self.some_id(rng)
        return rng.choice(["x", "\x00", "é"]) * rng.choice([65536, 1024 * 1024])

    def some_id(self, rng: random.Random) -> str:
        p = self.pools
        ids = [p.sentinel_pod, p.sentinel_ctr, *p.victim_pods, *p.victim_ctrs]
        full = rng.choice(ids) if ids else ""
        r = rng.random()
        if r < 0.6:
            return full
        if r < 0.8:
            return full[: rng.randrange(1, 64)]
        return "".join(rng.choice("0123456789abcdef") for _ in range(64))

    def scalar(self, f: FieldDescriptor, rng: random.Random, small: bool = False) -> object:
        t = f.type
        if t == F.TYPE_STRING:
            return self.string(rng, small)
        if t == F.TYPE_BYTES:
            return rng.choice([b"", b"\x00", b"\xff" * 17, rng.randbytes(rng.randrange(1, 200))])
        if t == F.TYPE_BOOL:
            return rng.random() < 0.5
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return rng.choice([0.0, -1.0, 1e300, float("inf"), float("nan"), rng.random()])
        if t == F.TYPE_ENUM:
            valid = [v.number for v in f.enum_type.values]
            if rng.random() < 0.3:
                return rng.choice([*valid, -1, 99, 2**31 - 1])
            return rng.choice(valid)
        lo, hi = INT_RANGE[t]
        return rng.choice(INT_BOUNDS[t]) if rng.random() < 0.7 else rng.randint(lo, hi)

    def _count(self, rng: random.Random, small: bool) -> int:
        """How many items a repeated field or map gets: mostly few, sometimes very many."""
        r = rng.random()
        if r < 0.35:
            return 0
        if r < 0.92 or small:
            return rng.randrange(1, 4)
        return rng.choice([100, 1000, 5000])

    # -- whole messages ---------------------------------------------------------------

    def fill(
        self, msg: Message, rng: random.Random, depth: int = 0, small: bool = False
    ) -> Message:
        for f in msg.DESCRIPTOR.fields:
            if rng.random() < 0.3 + 0.15 * depth:
                continue
            self.set_field(msg, f, rng, depth, small)
        return msg

    def set_field(
        self, msg: Message, f: FieldDescriptor, rng: random.Random, depth: int, small: bool = False
    ) -> None:
        """A random value for ``f``; inside a huge list or map everything is ``small``
        (no huge strings or lists), which keeps a request's size bounded."""
        if _is_map(f):
            m = getattr(msg, f.name)
            m.clear()
            key_f = f.message_type.fields_by_name["key"]
            val_f = f.message_type.fields_by_name["value"]
            n = self._count(rng, small)
            inner = small or n > 10
            for i in range(n):
                k = self.scalar(key_f, rng, inner)
                if n > 10 and isinstance(k, str):
                    k = f"{k}{i}"  # distinct keys
                if val_f.type == F.TYPE_MESSAGE:
                    if depth < MAX_DEPTH:
                        self.fill(m[k], rng, depth + 1, inner)
                else:
                    m[k] = self.scalar(val_f, rng, inner)
            return
        if f.is_repeated:
            r = getattr(msg, f.name)
            del r[:]
            n = self._count(rng, small)
            inner = small or n > 10
            if f.type != F.TYPE_MESSAGE:
                r.extend(self.scalar(f, rng, inner) for _ in range(n))
            elif depth < MAX_DEPTH:
                for _ in range(n):
                    self.fill(r.add(), rng, depth + 1, inner)
            return
        if f.type == F.TYPE_MESSAGE:
            if depth < MAX_DEPTH:
                sub = getattr(msg, f.name)
                sub.SetInParent()
                self.fill(sub, rng, depth + 1, small)
            return
        setattr(msg, f.name, self.scalar(f, rng, small))

    def mutate(self, msg: Message, rng: random.Random, n: int) -> None:
        """Change ``n`` randomly chosen fields, anywhere in the message tree."""
        for _ in range(n):
            node, depth = msg, 0
            while True:
                fields = list(node.DESCRIPTOR.fields)
                if not fields:
                    break
                f = rng.choice(fields)
                single_msg = f.type == F.TYPE_MESSAGE and not f.is_repeated
                if single_msg and depth < MAX_DEPTH and rng.random() < 0.65:
                    node, depth = getattr(node, f.name), depth + 1
                    continue
                self.set_field(node, f, rng, depth)
                break

    # -- requests ---------------------------------------------------------------------

    def request(self, index: int, rpc: str, cls: type[Message]) -> Message:
        rng = random.Random(f"{self.seed}:{index}")
        for _ in range(5):
            if rng.random() < 0.55:
                msg = self.template(rpc, cls, rng)
                self.mutate(msg, rng, rng.choice([1, 1, 2, 3, 6]))
            else:
                msg = self.fill(cls(), rng)
                self.inject_ids(msg, rng)
            self.harmless.sanitize(rpc, msg, rng)
            if msg.ByteSize() <= MAX_REQUEST_BYTES:
                return msg
        return self.template(rpc, cls, rng)

    def raw(self, index: int, rpc: str, cls: type[Message]) -> bytes | None:
        """Now and then, bytes that are no valid ``cls`` (invalid UTF-8 in a string,
        a truncated message, noise): only ever ones that fail to parse, so nothing
        unsanitized can succeed."""
        rng = random.Random(f"{self.seed}:{index}:raw")
        if rng.random() >= RAW_SHARE:
            return None
        data = self.template(rpc, cls, rng).SerializeToString()
        r = rng.random()
        strings = [f for f in cls.DESCRIPTOR.fields if f.type == F.TYPE_STRING]
        if r < 0.5 and strings:
            junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"a\x80b"])
            f = rng.choice(strings)
            data += _varint(f.number << 3 | 2) + _varint(len(junk)) + junk
        elif r < 0.8 and len(data) > 1:
            data = data[: rng.randrange(1, len(data))]
        else:
            data = rng.randbytes(rng.randrange(1, 64))
        try:
            cls.FromString(data)
        except Exception:
            return data
        return None

    def inject_ids(self, msg: Message, rng: random.Random, depth: int = 0) -> None:
        for f in msg.DESCRIPTOR.fields:
            if f.is_repeated:
                continue
            if f.type == F.TYPE_STRING and f.name in ID_FIELDS and rng.random() < 0.6:
                setattr(msg, f.name, self.some_id(rng))
            elif f.type == F.TYPE_MESSAGE and depth < 3 and msg.HasField(f.name):
                self.inject_ids(getattr(msg, f.name), rng, depth + 1)

    def template(self, rpc: str, cls: type[Message], rng: random.Random) -> Message:
        """A request that would succeed (or nearly so) as it stands."""
        p = self.pools
        msg = cls()
        victim_pod = rng.choice(p.victim_pods) if p.victim_pods else ""
        victim_ctr = rng.choice(p.victim_ctrs) if p.victim_ctrs else ""
        any_pod = rng.choice([p.sentinel_pod, victim_pod])
        any_ctr = rng.choice([p.sentinel_ctr, victim_ctr])
        if rpc == "RunPodSandbox":
            assert isinstance(msg, api_pb2.RunPodSandboxRequest)
            msg.config.CopyFrom(self.pod_config(rng))
            msg.runtime_handler = rng.choice(["", "host"])
        elif rpc == "CreateContainer":
            assert isinstance(msg, api_pb2.CreateContainerRequest)
            msg.pod_sandbox_id = victim_pod
            msg.config.CopyFrom(self.container_config(rng))
            msg.sandbox_config.CopyFrom(self.pod_config(rng))
        elif rpc in ("ExecSync", "Exec"):
            msg.container_id = any_ctr  # type: ignore[attr-defined]
            msg.cmd.extend(rng.choice(SAFE_COMMANDS))  # type: ignore[attr-defined]
            if rpc == "ExecSync":
                msg.timeout = rng.choice([0, 1, 5, 30])  # type: ignore[attr-defined]
            else:
                msg.stdout = True  # type: ignore[attr-defined]
        elif rpc == "Attach":
            msg.container_id = any_ctr  # type: ignore[attr-defined]
            msg.stdout = True  # type: ignore[attr-defined]
        elif rpc == "PortForward":
            msg.pod_sandbox_id = any_pod  # type: ignore[attr-defined]
            msg.port.append(rng.choice([80, 8080, 1]))  # type: ignore[attr-defined]
        elif rpc == "StopContainer":
            msg.container_id = victim_ctr  # type: ignore[attr-defined]
            msg.timeout = rng.choice([0, 1, 2])  # type: ignore[attr-defined]
        elif rpc == "UpdateContainerResources":
            assert isinstance(msg, api_pb2.UpdateContainerResourcesRequest)
            msg.container_id = victim_ctr
            msg.linux.CopyFrom(
                api_pb2.LinuxContainerResources(cpu_shares=512, memory_limit_in_bytes=256 << 20)
            )
        elif rpc in ("PullImage", "ImageStatus", "RemoveImage"):
            msg.image.image = p.image  # type: ignore[attr-defined]
        elif rpc == "UpdateRuntimeConfig":
            assert isinstance(msg, api_pb2.UpdateRuntimeConfigRequest)
            msg.runtime_config.network_config.pod_cidr = "10.244.0.0/16"
        for f in msg.DESCRIPTOR.fields:
            if f.type == F.TYPE_STRING and f.name == "pod_sandbox_id" and rpc != "CreateContainer":
                setattr(msg, f.name, any_pod if rpc in READ_ONLY else victim_pod)
            elif f.type == F.TYPE_STRING and f.name == "container_id":
                setattr(msg, f.name, any_ctr if rpc in READ_ONLY else victim_ctr)
        return msg

    def pod_config(self, rng: random.Random) -> api_pb2.PodSandboxConfig:
        name = f"fuzz-{rng.randrange(10**9)}"
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, namespace="fuzz", uid=name),
            hostname=name,
            log_directory=f"{self.pools.log_dir}/{name}",
            labels={"fuzz": "1"},
            port_mappings=[api_pb2.PortMapping(container_port=80, host_port=0)],
        )

    def container_config(self, rng: random.Random) -> api_pb2.ContainerConfig:
        return api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=f"c{rng.randrange(10**9)}"),
            image=api_pb2.ImageSpec(image=self.pools.image),
            command=TERM_TRAP,
            log_path="c.log",
            mounts=[api_pb2.Mount(container_path="/scratch", host_path=self.pools.scratch)],
        )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _is_map(f: FieldDescriptor) -> bool:
    return f.is_repeated and f.type == F.TYPE_MESSAGE and f.message_type.GetOptions().map_entry
