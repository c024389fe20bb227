"""The OCI ``process`` object: args, env, cwd, user, as containerd's CRI plugin builds it."""

from __future__ import annotations

from typing import Any

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.errors import InvalidArgument
from criv_agent.spec.users import UserDb

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def process_args(config: api_pb2.ContainerConfig, image: dict[str, Any]) -> list[str]:
    """CRI command replaces Entrypoint, CRI args replace Cmd (moby's commit.go rules)."""
    command = list(config.command)
    args = list(config.args)
    if not command:
        if not args:
            args = list(image.get("Cmd") or [])
        entry = list(image.get("Entrypoint") or [])
        if entry != [""]:
            command = entry
    argv = command + args
    if not argv:
        raise InvalidArgument("no command specified (neither CRI command/args nor image)")
    return argv


def merge_env(base: list[str], extra: list[str]) -> list[str]:
    """containerd's replaceOrAppendEnvValues: same key replaces in place, else appends."""
    out = list(base)
    index = {e.partition("=")[0]: i for i, e in enumerate(out)}
    for e in extra:
        key = e.partition("=")[0]
        if key in index:
            out[index[key]] = e
        else:
            index[key] = len(out)
            out.append(e)
    return out


def _text(v: str | bytes) -> str:
    # KeyValue.value is ``bytes`` in this tree's CRI proto (``string`` upstream)
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def process_env(config: api_pb2.ContainerConfig, image: dict[str, Any], hostname: str) -> list[str]:
    env = merge_env([DEFAULT_PATH], [f"HOSTNAME={hostname}"])
    env = merge_env(env, [str(e) for e in image.get("Env") or []])
    return merge_env(env, [f"{kv.key}={_text(kv.value)}" for kv in config.envs])


def user_string(sc: api_pb2.LinuxContainerSecurityContext, image: dict[str, Any]) -> str:
    """containerd's generateUserString, falling back to the image's User."""
    user = ""
    if sc.HasField("run_as_user"):
        user = str(sc.run_as_user.value)
    if sc.run_as_username:
        user = sc.run_as_username
    if user == "":
        if sc.HasField("run_as_group"):
            raise InvalidArgument("run_as_group is specified without a user")
        return str(image.get("User") or "")
    if sc.HasField("run_as_group"):
        user += f":{sc.run_as_group.value}"
    return user


def process_user(
    sc: api_pb2.LinuxContainerSecurityContext, image: dict[str, Any], users: UserDb
) -> dict[str, Any]:
    strict = sc.supplemental_groups_policy == api_pb2.SupplementalGroupsPolicy.Strict
    supplemental = [int(g) for g in sc.supplemental_groups]
    resolved = users.resolve(user_string(sc, image), supplemental, strict=strict)
    user: dict[str, Any] = {"uid": resolved.uid, "gid": resolved.gid}
    if resolved.additional_gids:
        user["additionalGids"] = list(resolved.additional_gids)
    return user


def build_process(
    config: api_pb2.ContainerConfig,
    image: dict[str, Any],
    users: UserDb,
    hostname: str,
) -> dict[str, Any]:
    sc = config.linux.security_context
    proc: dict[str, Any] = {
        "terminal": bool(config.tty),
        "args": process_args(config, image),
        "env": process_env(config, image, hostname),
        "cwd": config.working_dir or image.get("WorkingDir") or "/",
        "user": process_user(sc, image, users),
        "noNewPrivileges": bool(sc.no_new_privs),
    }
    if config.linux.resources.oom_score_adj:
        proc["oomScoreAdj"] = int(config.linux.resources.oom_score_adj)
    return proc
