"""``criv-agent-ctl``: a small debug client for an agent's control socket.

criv-agent-ctl --control unix:PATH health|list|status ID|exec ID CMD...|logs ID
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
from typing import Any


def _info(i: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    d: dict[str, Any] = json_format.MessageToDict(i, preserving_proto_field_name=True)
    return d


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="criv-agent-ctl")
    p.add_argument("--control", required=True, help="unix:PATH of the agent")
    p.add_argument("--data", help="unix:PATH of the data socket (for logs)")
    p.add_argument("--timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("health")
    sub.add_parser("list")
    st = sub.add_parser("status")
    st.add_argument("id")
    ex = sub.add_parser("exec")
    ex.add_argument("id")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    lg = sub.add_parser("logs")
    lg.add_argument("id")
    args = p.parse_args(argv)

    if args.cmd == "logs":
        sys.exit(_logs(args))

    import grpc

    from criv_agent.api.agent.v1 import agent_pb2, agent_pb2_grpc

    with grpc.insecure_channel(args.control) as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        t = args.timeout
        try:
            if args.cmd == "health":
                print(json.dumps(_info(stub.Health(agent_pb2.HealthRequest(), timeout=t))))
            elif args.cmd == "list":
                resp = stub.ListContainers(agent_pb2.ListContainersRequest(), timeout=t)
                for c in resp.containers:
                    print(json.dumps(_info(c)))
            elif args.cmd == "status":
                req = agent_pb2.ContainerRequest(container_id=args.id)
                print(json.dumps(_info(stub.ContainerStatus(req, timeout=t).info), indent=2))
            elif args.cmd == "exec":
                r = stub.ExecSync(
                    agent_pb2.ExecSyncRequest(
                        container_id=args.id, cmd=args.argv, timeout_seconds=int(t)
                    ),
                    timeout=t + 5,
                )
                sys.stdout.buffer.write(r.stdout)
                sys.stderr.buffer.write(r.stderr)
                sys.exit(r.exit_code)
        except grpc.RpcError as e:
            sys.exit(f"{e.code().name}: {e.details()}")


def _logs(args: argparse.Namespace) -> int:
    from criv_agent.api.agent.v1 import agent_pb2

    if not args.data or not args.data.startswith("unix:"):
        print("logs needs --data unix:PATH", file=sys.stderr)
        return 2
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(args.data[len("unix:") :])
        msg = agent_pb2.StreamOpen(kind=agent_pb2.StreamOpen.LOG, container_id=args.id)
        body = msg.SerializeToString()
        s.sendall(struct.pack(">I", len(body)) + body)
        f = s.makefile("rb")
        (n,) = struct.unpack(">I", f.read(4))
        acc = agent_pb2.StreamAccept.FromString(f.read(n))
        if not acc.ok:
            print(acc.error, file=sys.stderr)
            return 1
        while chunk := f.read1(65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    main()
