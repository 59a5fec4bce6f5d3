"""The alive-switch CLI as this collection's modules see it: argv, events, exit codes.

The CLI is the interface, never alive-switch's Python internals (a host's alive-switch may
be another version than the controller's). ``deploy|rollback ENV … --json`` writes one JSON
object per line on stdout, the last one the outcome::

    {"event": "phase", "phase": "health", "status": "ok", "seconds": 0.6, …}
    {"event": "message", "text": "blue on standby; retires in 600 s (…)"}
    {"event": "outcome", "kind": "deploy", "ok": true, "exit_code": 0, "target": "green",
     "build": "b2", "message": "…", "phases": {"health": 0.61, …}, "warnings": []}

``status ENV --json`` writes one object (``schema`` 1: ``live``, ``live_build``, …).

What each exit code becomes in a module's result::

    0  ok                       changed unless the live color and build are what they were
    2  usage or config          failed (nothing was changed)
    3  aborted before switch    failed; the old color still serves
    4  lock held                failed, retryable: true
    5  switched back            failed, switched_back: true
    6  needs repair             failed; the hint names `alive-switch repair ENV`
    other                       failed (internal error)

Pure functions only (no Ansible import): the modules and the unit tests share them.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_VENV_BIN = "/opt/alive-switch/bin"  # the host role's default virtualenv

MEANING = {
    1: "internal error",
    2: "usage or config error; nothing was changed",
    3: "aborted before the switch; the old color still serves",
    4: "another command holds the environment's lock; retry when it is done",
    5: "switched, then switched back automatically during the watch",
    6: "the environment's state needs repair",
}

DEPLOY_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "env": {"type": "str", "required": True},
    "build": {"type": "str"},
    "rollback": {"type": "bool", "default": False},
    "force": {"type": "bool", "default": False},
    "config": {"type": "path"},
    "executable": {"type": "path"},
}
DEPLOY_MUTUALLY_EXCLUSIVE = [["build", "rollback"], ["force", "rollback"]]

INFO_ARGUMENT_SPEC: dict[str, dict[str, Any]] = {
    "env": {"type": "str"},
    "config": {"type": "path"},
    "executable": {"type": "path"},
}


def problems(params: dict[str, Any]) -> list[str]:
    """What is wrong with a module's parameters beyond their types (empty: nothing)."""
    found = []
    env = params.get("env")
    if env is not None and (not env or "/" in env or env.startswith("-")):
        found.append(f"env {env!r} is not an environment name (as in [env.NAME] of the config)")
    build = params.get("build")
    if build is not None and not _build_ok(build):
        found.append(f"build {build!r} must be one directory name inside the environment's "
                     "builds (no '/', not '.' or '..'), or an absolute path to one")
    return found


def _build_ok(build: str) -> bool:
    if build.startswith("/"):
        return build.rstrip("/") != ""
    return bool(build) and "/" not in build and build not in (".", "..") \
        and not build.startswith("-")


def global_args(params: dict[str, Any]) -> list[str]:
    return ["--config", params["config"]] if params.get("config") else []


def deploy_argv(executable: str, params: dict[str, Any], *, check_mode: bool) -> list[str]:
    """``alive-switch [--config C] deploy ENV [BUILD] [--force]`` or ``rollback ENV``."""
    argv = [executable, *global_args(params)]
    if params.get("rollback"):
        argv += ["rollback", params["env"]]
    else:
        argv += ["deploy", params["env"]]
        if params.get("build"):
            argv.append(params["build"])
        if params.get("force"):
            argv.append("--force")
    if check_mode:
        argv.append("--dry-run")
    return [*argv, "--json"]


def status_argv(executable: str, params: dict[str, Any]) -> list[str]:
    env = [params["env"]] if params.get("env") else []
    return [executable, *global_args(params), "status", *env, "--json"]


def events(stdout: str) -> list[dict[str, Any]]:
    """The JSON objects of stdout, one per line (other lines are skipped)."""
    found = []
    for line in stdout.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            found.append(event)
    return found


def live_of(status: dict[str, Any] | None) -> dict[str, Any]:
    """The live color and build of a ``status ENV --json`` object."""
    status = status or {}
    return {"color": status.get("live"), "build": status.get("live_build")}


def deploy_result(rc: int, stdout: str, stderr: str, before: dict[str, Any],
                  params: dict[str, Any]) -> dict[str, Any]:
    """A deploy module's result (``failed`` set when rc is not 0) from the CLI's run."""
    seen = events(stdout)
    outcome = next((e for e in reversed(seen) if e.get("event") == "outcome"), {})
    result: dict[str, Any] = {
        "rc": rc,
        "outcome": outcome,
        "phases": outcome.get("phases") or {},
        "messages": [e["text"] for e in seen if e.get("event") == "message" and "text" in e],
        "build": outcome.get("build"),
        "color": outcome.get("target"),
        "switched_back": rc == 5,
        "retryable": rc == 4,
    }
    if rc != 0:
        return result | {"failed": True, "changed": rc == 5, "msg": failure_message(
            rc, outcome, stderr, params)}
    after = {"color": outcome.get("target"), "build": outcome.get("build")}
    return result | {"changed": after != before, "msg": outcome.get("message", ""),
                     "diff": {"before": _diff_text(before), "after": _diff_text(after)}}


def failure_message(rc: int, outcome: dict[str, Any], stderr: str,
                    params: dict[str, Any]) -> str:
    """``alive-switch deploy production b3 exited 3 (aborted before …): <message>; <hint>``."""
    command = "rollback" if params.get("rollback") else "deploy"
    target = params.get("build") or ""
    head = f"alive-switch {command} {params.get('env')} {target}".rstrip()
    meaning = MEANING.get(rc, "internal error")
    detail = outcome.get("message") or _last_lines(stderr) or "no message"
    hint = outcome.get("hint") or ("run: alive-switch repair " + str(params.get("env"))
                                   if rc == 6 else "")
    text = f"{head} exited {rc} ({meaning}): {detail}"
    return f"{text}; {hint}" if hint else text


def _last_lines(text: str, count: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-count:])


def _diff_text(live: dict[str, Any]) -> str:
    return f"live color: {live.get('color')}\nlive build: {live.get('build')}\n"
