"""alive_switch.fleet.deploy (ansible/): its argument validation and how the CLI's exit codes
and JSON become the module's result; the module itself run as Ansible runs it, against a
fake ``alive-switch`` that answers what a test tells it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

ROOT = Path(__file__).resolve().parents[2]
COLLECTION = ROOT / "ansible"
LIVE_B1 = {"schema": 1, "live": "blue", "live_build": "b1"}
FAKE_CLI = """\
#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if "status" in sys.argv:
    print(os.environ["FAKE_STATUS"])
    sys.exit(0)
sys.stdout.write(os.environ["FAKE_OUT"])
sys.stderr.write(os.environ.get("FAKE_ERR", ""))
sys.exit(int(os.environ["FAKE_RC"]))
"""


def load_cli() -> ModuleType:
    path = COLLECTION / "plugins/module_utils/alive_switch_cli.py"
    spec = importlib.util.spec_from_file_location("alive_switch_cli", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = load_cli()


def outcome_line(**fields: Any) -> str:
    return json.dumps({"event": "outcome", **fields}) + "\n"


def params(**given: Any) -> dict[str, Any]:
    return {"env": "prod", "build": None, "rollback": False, "force": False, "config": None,
            "executable": None, **given}


# -- argument validation ---------------------------------------------------------------------


def validate(**given: Any) -> list[str]:
    validator = ArgumentSpecValidator(cli.DEPLOY_ARGUMENT_SPEC,
                                      mutually_exclusive=cli.DEPLOY_MUTUALLY_EXCLUSIVE)
    result = validator.validate(given)
    return [str(error) for error in result.errors] + cli.problems(result.validated_parameters)


def test_valid_arguments_pass_and_are_coerced() -> None:
    assert validate(env="prod", build="2026-02-03.2", force="yes") == []
    validator = ArgumentSpecValidator(cli.DEPLOY_ARGUMENT_SPEC)
    assert validator.validate({"env": "prod", "rollback": "true"}).validated_parameters[
        "rollback"] is True
    assert validate(env="prod", build="/srv/alive/builds/prod/b2") == []


def test_env_is_required() -> None:
    assert any("env" in error for error in validate(build="b2"))


def test_build_and_rollback_exclude_each_other() -> None:
    (error,) = validate(env="prod", build="b2", rollback=True)
    assert "mutually exclusive" in error and "build" in error and "rollback" in error
    assert validate(env="prod", force=True, rollback=True)


@pytest.mark.parametrize("build", ["a/b", ".", "..", "", "-b2", "/"])
def test_a_build_must_be_one_name_or_an_absolute_path(build: str) -> None:
    (error,) = validate(env="prod", build=build)
    assert repr(build) in error and "one directory name" in error


@pytest.mark.parametrize("env", ["", "a/b", "--dry-run"])
def test_an_env_must_be_a_name(env: str) -> None:
    (error,) = validate(env=env)
    assert "not an environment name" in error


# -- argv ---------------------------------------------------------------------------------------


def test_argv_for_deploy_rollback_and_check_mode() -> None:
    exe = "/opt/alive-switch/bin/alive-switch"
    assert cli.deploy_argv(exe, params(build="b2"), check_mode=False) == [
        exe, "deploy", "prod", "b2", "--json"]
    assert cli.deploy_argv(exe, params(build="b2", force=True, config="/etc/a.toml"),
                           check_mode=True) == [
        exe, "--config", "/etc/a.toml", "deploy", "prod", "b2", "--force", "--dry-run", "--json"]
    assert cli.deploy_argv(exe, params(rollback=True), check_mode=False) == [
        exe, "rollback", "prod", "--json"]
    assert cli.status_argv(exe, params()) == [exe, "status", "prod", "--json"]


# -- exit codes and outcome ---------------------------------------------------------------------


def test_a_deploy_that_switched_is_changed_with_a_diff() -> None:
    out = (json.dumps({"event": "phase", "phase": "health", "status": "ok"}) + "\n"
           + json.dumps({"event": "message", "text": "blue on standby"}) + "\n"
           + outcome_line(kind="deploy", ok=True, exit_code=0, target="green", build="b2",
                          message="b2 is live on green", phases={"health": 0.6}))
    result = cli.deploy_result(0, out, "", cli.live_of(LIVE_B1), params(build="b2"))
    assert result["changed"] is True and "failed" not in result
    assert (result["build"], result["color"], result["phases"]) == ("b2", "green",
                                                                    {"health": 0.6})
    assert result["messages"] == ["blue on standby"]
    assert result["diff"] == {"before": "live color: blue\nlive build: b1\n",
                              "after": "live color: green\nlive build: b2\n"}


def test_an_already_live_build_is_not_changed() -> None:
    out = outcome_line(kind="deploy", ok=True, exit_code=0, target="blue", build="b1",
                       message="build b1 is already live on blue: nothing to do", phases={})
    result = cli.deploy_result(0, out, "", cli.live_of(LIVE_B1), params(build="b1"))
    assert result["changed"] is False and "failed" not in result


@pytest.mark.parametrize(("rc", "meaning", "switched_back", "retryable"), [
    (3, "aborted before the switch; the old color still serves", False, False),
    (4, "another command holds the environment's lock", False, True),
    (5, "switched, then switched back automatically", True, False),
    (6, "needs repair", False, False),
    (1, "internal error", False, False),
])
def test_exit_codes_fail_with_their_meaning(rc: int, meaning: str, switched_back: bool,
                                            retryable: bool) -> None:
    out = outcome_line(kind="deploy", ok=False, exit_code=rc, message="green failed",
                       hint="see: journalctl")
    result = cli.deploy_result(rc, out, "", cli.live_of(LIVE_B1), params(build="b2"))
    assert result["failed"] is True
    assert result["msg"].startswith(f"alive-switch deploy prod b2 exited {rc} (")
    assert meaning in result["msg"] and "green failed; see: journalctl" in result["msg"]
    assert (result["switched_back"], result["retryable"]) == (switched_back, retryable)


def test_a_usage_error_without_json_reports_stderr() -> None:
    result = cli.deploy_result(2, "", "error: /etc/a.toml: unknown key 'lsten' (did you mean "
                               "'listen'?)\n", cli.live_of(None), params(rollback=True))
    assert result["failed"] is True and result["outcome"] == {}
    assert result["msg"].startswith("alive-switch rollback prod exited 2 (usage or config")
    assert "unknown key 'lsten'" in result["msg"]


def test_needs_repair_names_the_command() -> None:
    result = cli.deploy_result(6, "", "state.json does not parse", cli.live_of(None), params())
    assert "run: alive-switch repair prod" in result["msg"]


# -- the module, run as Ansible runs it ---------------------------------------------------------


@pytest.fixture
def run_module(tmp_path: Path) -> Any:
    tree = tmp_path / "collections/ansible_collections/alive_switch"
    tree.mkdir(parents=True)
    (tree / "fleet").symlink_to(COLLECTION)
    fake = tmp_path / "alive-switch"
    fake.write_text(FAKE_CLI.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def run(args: dict[str, Any], *, rc: int = 0, out: str = "", err: str = "",
            check_mode: bool = False) -> tuple[dict[str, Any], list[list[str]]]:
        module_args = {"executable": str(fake), **args, "_ansible_check_mode": check_mode}
        args_file = tmp_path / "args.json"
        args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": module_args}))
        env = {"PYTHONPATH": str(tmp_path / "collections"), "PATH": "/usr/bin:/bin",
               "FAKE_LOG": str(log), "FAKE_STATUS": json.dumps(LIVE_B1), "FAKE_OUT": out,
               "FAKE_ERR": err, "FAKE_RC": str(rc)}
        done = subprocess.run(
            [sys.executable, "-m", "ansible_collections.alive_switch.fleet.plugins.modules.deploy",
             str(args_file)], capture_output=True, text=True, env=env, timeout=60, check=False)
        calls = [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []
        log.unlink(missing_ok=True)
        return json.loads(done.stdout), calls

    return run


def test_module_runs_deploy_and_reports_the_outcome(run_module: Any) -> None:
    out = outcome_line(kind="deploy", ok=True, exit_code=0, target="green", build="b2",
                       message="b2 is live on green", phases={"health": 0.5})
    result, calls = run_module({"env": "prod", "build": "b2"}, out=out)
    assert result["changed"] is True and not result.get("failed")
    assert result["color"] == "green"
    assert calls[-1] == ["deploy", "prod", "b2", "--json"]


def test_module_check_mode_is_a_dry_run(run_module: Any) -> None:
    out = outcome_line(kind="deploy", ok=True, exit_code=0, target="green", build="b2",
                       message="dry run")
    result, calls = run_module({"env": "prod", "build": "b2"}, out=out, check_mode=True)
    assert result["changed"] is True
    assert calls[-1] == ["deploy", "prod", "b2", "--dry-run", "--json"]


def test_module_fails_on_exit_5_with_switched_back(run_module: Any) -> None:
    out = outcome_line(kind="deploy", ok=False, exit_code=5,
                       message="green died during watch; blue serves again", hint="")
    result, _ = run_module({"env": "prod", "build": "b2"}, rc=5, out=out)
    assert result["failed"] is True and result["switched_back"] is True
    assert "exited 5" in result["msg"] and "blue serves again" in result["msg"]


def test_module_rejects_bad_arguments_before_running_anything(run_module: Any) -> None:
    result, calls = run_module({"env": "prod", "build": "../etc"})
    assert result["failed"] is True and "one directory name" in result["msg"]
    assert calls == []
    result, calls = run_module({"env": "prod", "build": "b2", "rollback": True})
    assert result["failed"] is True and "mutually exclusive" in result["msg"]
    assert calls == []


@pytest.mark.parametrize("module", ["deploy", "info"])
def test_module_documentation_parses_for_ansible_doc(module: str) -> None:
    from ansible.utils.plugin_docs import read_docstring

    docs = read_docstring(str(COLLECTION / f"plugins/modules/{module}.py"))
    assert docs["doc"]["module"] == module
    assert set(docs["doc"]["options"]) == set(
        cli.DEPLOY_ARGUMENT_SPEC if module == "deploy" else cli.INFO_ARGUMENT_SPEC)
    assert docs["plainexamples"] and docs["returndocs"]
