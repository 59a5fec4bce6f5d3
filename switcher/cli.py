"""The command line: parse, call one operation, print its result. The only place that exits.

Heavy modules (Jinja2; psutil, through the pre-flight checks) are imported only by the
commands that need them, so ``status`` and ``rollback`` start fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from switcher import config
from switcher.errors import SwitchError, UsageError
from switcher.model import Color

if TYPE_CHECKING:
    from switcher.ops.deploy import Deployer
    from switcher.ops.outcome import Outcome
    from switcher.progress import Progress

EPILOG = """\
exit codes: 0 ok (also "already live") · 1 internal error · 2 usage or config ·
3 aborted before the switch, the old color still serves · 4 lock held ·
5 the new color got traffic (a canary step or the switch), then every client went back
(a failed step or watch, or `abort`) · 6 state needs `alive-switch repair ENV`
"""

FIRST_STEPS = """\
first steps:
  alive-switch init production --listen 9000 --ports 9001,9002 \\
      --exec '/usr/bin/node server.js' --builds /srv/alive/builds/production \\
      --health /api/health
  alive-switch install production
  alive-switch deploy production            # the newest build in `builds`
  alive-switch status production
  alive-switch rollback production

Every command has examples: alive-switch COMMAND --help. To see it all work first, in a
private systemd with the sample app: examples/demo/run (in the source tree).

"""

EXAMPLES = {
    "install": "alive-switch install production\nalive-switch install production --rebind\n"
               "alive-switch install production --takeover alive-production.service "
               "--dry-run\n"
               "alive-switch install production --takeover alive-legacy.service 2026-02-03.2",
    "uninstall": "alive-switch uninstall staging\nalive-switch uninstall staging --purge",
    "logs": "alive-switch logs production\nalive-switch logs production green -f\n"
            "alive-switch logs production -n 50",
    "prune": "alive-switch prune production --keep 5 --dry-run\n"
             "alive-switch prune production --keep 5",
    "render": "alive-switch render production\nalive-switch render production --out units/",
    "deploy": "alive-switch deploy production                 # the newest build\n"
              "alive-switch deploy production 2026-02-03.2     # a named build\n"
              "alive-switch deploy production 2026-02-03.2 --dry-run\n"
              "alive-switch deploy production --json | jq -c 'select(.event == \"phase\")'\n"
              "alive-switch deploy production --canary 5,25,50 --step-seconds 60",
    "promote": "alive-switch promote production   # the running canary: full switch now",
    "abort": "alive-switch abort production     # the running canary: every client back now",
    "pause": "alive-switch pause production --max-wait 120   # e.g. from a pre_switch hook\n"
             "alive-switch resume production",
    "resume": "alive-switch resume production",
    "rollback": "alive-switch rollback production            # back to the previous build\n"
                "alive-switch rollback production            # again: forward, like `cd -`\n"
                "alive-switch rollback production --dry-run",
    "retire": "alive-switch retire production blue          # what the retire timers run",
    "repair": "alive-switch repair production",
    "check": "alive-switch check production\nalive-switch check production 2026-02-03.2",
    "status": "alive-switch status production\n"
              "alive-switch status production --json | jq -r .live\n"
              "alive-switch status                     # every environment, one line each",
    "history": "alive-switch history production",
    "init": "alive-switch init production --listen 9000 --ports 9001,9002 \\\n"
            "    --exec '/usr/bin/node server.js' --builds /srv/alive/builds/production \\\n"
            "    --health /api/health\n"
            "alive-switch --config ./alive-switch.toml init staging --listen 8998 \\\n"
            "    --ports 8996,8997 --exec '/usr/bin/node server.js' \\\n"
            "    --builds /srv/alive/builds/staging --health /api/health --app alive",
}


PAUSE_MAX_WAIT = 30.0  # seconds a pause holds requests unless --max-wait says otherwise
# The commands that take the environment's lock, and so take --wait.
LOCKING = ("install", "deploy", "rollback", "retire", "repair", "uninstall", "prune")


def _percents(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole percents such as "
                                         "5,25,50") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _delivery_commands(command: Any, deploy: argparse.ArgumentParser) -> None:
    """deploy's canary options; promote, abort, pause, resume."""
    deploy.add_argument("--canary", type=_percents, default=None, metavar="P1,P2,…",
                        help="before the full switch, send these percents of clients to the "
                        "new color in turn, each step judged on its traffic (default: "
                        "[env.*.canary] steps)")
    deploy.add_argument("--step-seconds", type=float, default=None, metavar="SECONDS",
                        help="how long each canary step lasts (default: [env.*.canary] "
                        "step_seconds)")
    for name, text in (("promote", "finish the running canary now: the full switch"),
                       ("abort", "end the running canary now: every client back on the old "
                        "color, the new one stopped")):
        command(name, text)
    p = command("pause", "hold new requests (tcp: connections) until resume or --max-wait; "
                "never waits for the deploy lock")
    p.add_argument("--max-wait", type=_seconds, default=PAUSE_MAX_WAIT, metavar="SECONDS",
                   help=f"then answer held requests 503 with Retry-After (default "
                   f"{PAUSE_MAX_WAIT:g})")
    command("resume", "release the requests held by pause")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alive-switch", epilog=FIRST_STEPS + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Zero-downtime blue/green deploys for apps run by systemd.")
    parser.add_argument("--config", help=f"config file (default: ${config.ENV_VAR} or "
                        f"{config.DEFAULT_PATH})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, *, env_optional: bool = False
                ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text,
                           epilog=f"examples:\n  {EXAMPLES[name].replace(chr(10), chr(10) + '  ')}"
                           f"\n\n{EPILOG}", formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("env", metavar="ENV", nargs="?" if env_optional else None,
                       help="environment name from the config"
                       + (" (default: every environment)" if env_optional else ""))
        p.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name in LOCKING:
            p.add_argument("--wait", type=_seconds, default=None, metavar="SECONDS",
                           help="if another command holds the environment's lock, queue "
                           "behind it for at most SECONDS, then exit 4 (default: exit 4 at "
                           "once; a retire always waits; any command waits for a retire)")
        return p

    p = command("install", "render and install the units, start the socket and the router")
    p.add_argument("--unit-dir", default=None, help="where units go (default "
                   "/etc/systemd/system)")
    p.add_argument("--rebind", action="store_true", help="accept a short gap to apply a "
                   "changed [Socket] section")
    p.add_argument("--takeover", nargs="+", metavar=("UNIT", "BUILD"), default=None,
                   help="usage: --takeover UNIT [BUILD]. Cut over from the legacy UNIT that "
                   "binds the public port itself: start BUILD (default: the newest) as blue, "
                   "prove it healthy, stop and disable UNIT (its file backed up), bind the "
                   "socket, serve blue; prints the gap")
    p.add_argument("--dry-run", action="store_true")
    p = command("render", "print the units, or write them under --out")
    p.add_argument("--out", default=None, help="write the files here, drop-in folders included")
    p = command("deploy", "start the idle color on BUILD, health-check it, switch, drain")
    p.add_argument("build", nargs="?", metavar="BUILD", help="a build name inside `builds` "
                   "(default: the newest)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--force", action="store_true", help="deploy even if BUILD is live")
    p.add_argument("--json", action="store_true", help="JSON events on stdout, one per "
                   "line: each phase, then the outcome")
    _delivery_commands(command, p)
    p = command("rollback", "make the previous live color and build live again")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--json", action="store_true", help="as for deploy")
    p = command("retire", "stop COLOR unless it is live, pending or the fallback")
    p.add_argument("color", choices=[c.value for c in Color])
    p = command("check", "pre-flight checks alone (exit 0: no failure; warnings never block)")
    p.add_argument("build", nargs="?", metavar="BUILD", help="the build to check (default: "
                   "the newest)")
    command("repair", "rebuild state.json from the router, the color links and history")
    p = command("status", "live color and build, each color's unit, health and traffic; "
                "without ENV one line per environment", env_optional=True)
    p.add_argument("--json", action="store_true", help="JSON only on stdout (schema 1)")
    p = command("uninstall", "stop, disable and remove the environment's units (not its "
                "builds); other environments are untouched")
    p.add_argument("--purge", action="store_true", help="also remove its state directory "
                   "(state, history, color links, a takeover backup)")
    p.add_argument("--unit-dir", default=None, help="where the units are (default "
                   "/etc/systemd/system)")
    p = command("logs", "the journal of the socket, the router and both colors (or COLOR)")
    p.add_argument("color", nargs="?", choices=[c.value for c in Color], metavar="COLOR",
                   help="only this color: blue or green")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    p.add_argument("-n", "--lines", type=int, default=None, metavar="N",
                   help="only the last N entries")
    p = command("prune", "remove old build directories; never the live, standby, pending or "
                "linked ones")
    p.add_argument("--keep", type=int, required=True, metavar="N", help="keep the N newest "
                   "builds (by mtime) besides the protected ones")
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    command("history", "deploys, rollbacks and retirements with per-phase timings")
    p = command("init", "write a commented config for ENV, or add ENV to an existing one "
                "(--config PATH; never overwrites an environment)")
    p.add_argument("--listen", required=True, help="the public port, or ADDR:PORT")
    p.add_argument("--ports", required=True, metavar="BLUE,GREEN",
                   help="the colors' own ports, e.g. 9001,9002")
    p.add_argument("--exec", required=True, metavar="COMMAND", help="how to run the app in "
                   "a build directory (ExecStart syntax, absolute path first)")
    p.add_argument("--builds", required=True, metavar="DIR", help="the directory holding "
                   "the builds")
    p.add_argument("--health", required=True, metavar="PATH", help="the health check path, "
                   "e.g. /api/health")
    p.add_argument("--app", default=None, help="unit prefix for a new file (default: "
                   "alive); must match an existing file's")
    return parser


def main(argv: list[str] | None = None) -> NoReturn:
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
    except SwitchError as exc:
        print(f"alive-switch: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # A closed pipe (e.g. `| head`) is not an error; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        hint = ("run alive-switch as root" if isinstance(exc, PermissionError)
                else "check the path, free space and permissions")
        print(f"alive-switch: {exc.strerror or exc}{where}\n  next: {hint}", file=sys.stderr)
        code = 1
    sys.exit(code)


def _run(args: argparse.Namespace) -> int:
    path = config.config_path(args.config)
    if args.command == "init":  # before loading: the file may not exist yet
        return _init(Path(path), args)
    cfg = config.load(path, check_owner=args.command != "render")
    if args.command == "status":  # ENV is optional here only
        return _status(cfg, args.env, as_json=args.json)
    env = cfg.environment(args.env)
    if args.command == "render":
        return _render(cfg, env, args.out)
    if args.command in ("install", "uninstall", "logs", "prune"):
        return _lifecycle(cfg, env, args)
    if args.command == "history":
        from switcher import state  # noqa: PLC0415
        from switcher.ops import status  # noqa: PLC0415

        for line in status.history_lines(state.read_history(cfg.env_dir(env))):
            print(line)
        return 0
    return _mutate(cfg, env, args)


def _init(path: Path, args: argparse.Namespace) -> int:
    from switcher.ops import init  # noqa: PLC0415

    req = init.Request(args.env, init.parse_listen(args.listen), init.parse_ports(args.ports),
                       args.exec, args.builds, args.health)
    written = init.write(path, req, app=args.app, router_exec=_router_exec())
    verb = "wrote" if written.created else "added environment to"
    print(f"{verb} {path}: [env.{args.env}] of app {written.app!r}")
    warning = init.owner_warning(path)
    if warning:
        print(f"note: {warning}")
    print(f"next: alive-switch install {args.env} && alive-switch deploy {args.env}"
          + ("" if path == Path(config.DEFAULT_PATH) else f"   (with --config {path})"))
    return 0


def _router_exec() -> str:
    """The router beside this alive-switch (a virtualenv's bin/), else the default path."""
    beside = Path(sys.argv[0]).absolute().parent / "alive-switch-router"
    if Path(sys.argv[0]).name == "alive-switch" and beside.is_file():
        return str(beside)
    return config.Config.router_exec


def _say(line: str) -> None:
    print(line, flush=True)


def _render(cfg: config.Config, env: config.Environment, out: str | None) -> int:
    from switcher import render  # noqa: PLC0415
    from switcher.ops import install  # noqa: PLC0415

    files = render.render(cfg, env)
    if out is None:
        for rel, text in files.items():
            print(f"# --- {rel}\n{text}")
        return 0
    for rel in install.write_units(files, Path(out)):
        print(f"wrote {Path(out) / rel}")
    return 0


def _install(cfg: config.Config, env: config.Environment, args: argparse.Namespace) -> int:
    from switcher.ops import install  # noqa: PLC0415
    from switcher.systemd import Systemctl  # noqa: PLC0415

    unit_dir = Path(args.unit_dir or install.DEFAULT_UNIT_DIR)
    if args.takeover is not None:
        return _takeover(cfg, env, args, unit_dir)
    if args.dry_run:
        install.install(cfg, env, Systemctl(), unit_dir, rebind=args.rebind, dry_run=True,
                        say=_say)
        return 0
    # Exclusive with deploys: a router reload or --rebind must not land mid-switch.
    d = _deployer(cfg, env, lock_wait=args.wait)
    with d.lock(f"install {env.name}" + (" --rebind" if args.rebind else "")):
        _resume_takeover(d)
        install.install(cfg, env, Systemctl(), unit_dir, rebind=args.rebind, dry_run=False,
                        say=_say)
    return 0


def _resume_takeover(d: Deployer) -> None:
    """A takeover whose CLI died left the stand-in router and its socket: finish it (or
    undo it) before install rewrites those units."""
    from switcher.ops.takeover import runner as takeover  # noqa: PLC0415

    if takeover.intent_path(d).exists():
        takeover.resume(d)


def _takeover(cfg: config.Config, env: config.Environment, args: argparse.Namespace,
              unit_dir: Path) -> int:
    from switcher.ops.takeover.runner import Takeover  # noqa: PLC0415

    if len(args.takeover) > 2:
        raise UsageError(f"--takeover takes UNIT and at most one BUILD, not "
                         f"{' '.join(args.takeover)}", "alive-switch install ENV --takeover "
                         "UNIT [BUILD]")
    if args.rebind:
        raise UsageError("--takeover and --rebind do not go together",
                         "a takeover binds the socket for the first time: drop --rebind")
    unit, build = args.takeover[0], (args.takeover[1:] or [None])[0]
    Takeover(_deployer(cfg, env, lock_wait=args.wait), unit_dir).run(unit, build,
                                                                      dry_run=args.dry_run)
    return 0


def _lifecycle(cfg: config.Config, env: config.Environment, args: argparse.Namespace) -> int:
    from switcher.ops import install, logs, prune, uninstall  # noqa: PLC0415

    if args.command == "install":
        return _install(cfg, env, args)
    if args.command == "logs":
        argv = logs.journal_argv(cfg, env, Color(args.color) if args.color else None,
                                      follow=args.follow, lines=args.lines)
        sys.stdout.flush()
        os.execvp(argv[0], argv)  # noqa: S606 - journalctl, found on PATH like systemctl
    d = _deployer(cfg, env, lock_wait=args.wait)
    if args.command == "uninstall":
        uninstall.uninstall(cfg, env, d.sd, Path(args.unit_dir or install.DEFAULT_UNIT_DIR),
                            purge=args.purge, lock=d.lock(f"uninstall {env.name}"), say=_say)
        return 0
    prune.prune(cfg, env, args.keep, dry_run=args.dry_run,
                    lock_for=lambda e, what: _deployer(cfg, e, lock_wait=args.wait).lock(what),
                    say=_say)
    return 0


def _status_all(cfg: config.Config, *, as_json: bool) -> int:
    from switcher.ops import status  # noqa: PLC0415

    infos = []
    for env in cfg.env.values():
        d = _deployer(cfg, env)
        infos.append(status.collect(cfg, env, d.sd, d.router))
    if as_json:
        print(json.dumps(status.collect_all(infos), indent=2))
    else:
        for line in status.render_overview(infos):
            print(line)
    return 0


def _deployer(cfg: config.Config, env: config.Environment, say: Any = _say,
              progress: Progress | None = None, lock_wait: float | None = None) -> Deployer:
    from switcher.names import Names  # noqa: PLC0415
    from switcher.ops.deploy import Deployer  # noqa: PLC0415
    from switcher.routerctl import ControlSocket  # noqa: PLC0415
    from switcher.systemd import Systemctl  # noqa: PLC0415

    names = Names(cfg.app, env.name)
    router = ControlSocket(names.control_socket, names.router)
    return Deployer(cfg, env, Systemctl(), router, say=say, progress=progress,
                    lock_wait=lock_wait)


def _status(cfg: config.Config, env_name: str | None, *, as_json: bool) -> int:
    from switcher.ops import status  # noqa: PLC0415

    if env_name is None:
        return _status_all(cfg, as_json=as_json)
    env = cfg.environment(env_name)
    d = _deployer(cfg, env)
    info = status.collect(cfg, env, d.sd, d.router)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        for line in status.render_table(info):
            print(line)
    return 0


def _check(d: Deployer, build_arg: str | None) -> int:
    from switcher.ops import builds, checks  # noqa: PLC0415

    build = builds.resolve(d.env, build_arg)
    live = d.load_state().active
    target = live.other if live else Color.blue
    print(f"checking {build.name} for {target} ({d.prefix}):")
    results = d.preflight(target, live, build.path)
    for result in results:
        if result.level is checks.Level.ok:
            print(f"    {result.line()}")
    failed = checks.failures(results)
    print(f"{len(failed)} failed, "
          f"{sum(r.level is checks.Level.warning for r in results)} warnings")
    return 3 if failed else 0


def _operate(d: Deployer, args: argparse.Namespace) -> Outcome:
    from switcher.ops import orders  # noqa: PLC0415
    from switcher.ops.canary import Order  # noqa: PLC0415

    if args.command == "deploy":
        return d.deploy(args.build, force=args.force, dry_run=args.dry_run,
                        steps=_canary(d.env, args))
    if args.command == "rollback":
        return d.rollback(dry_run=args.dry_run)
    if args.command == "pause":
        return orders.pause(d, args.max_wait)
    if args.command == "resume":
        return orders.resume(d)
    return orders.give(d, Order(args.command))


def _canary(env: config.Environment, args: argparse.Namespace) -> config.Canary | None:
    """The canary --canary/--step-seconds ask for (None: the config's)."""
    if args.canary is None and args.step_seconds is None:
        return None
    steps = args.canary if args.canary is not None else env.canary.steps
    seconds = args.step_seconds if args.step_seconds is not None else env.canary.step_seconds
    problem = config.canary_problem(steps, seconds)
    if problem:
        raise UsageError(f"--canary {','.join(map(str, steps))} --step-seconds {seconds:g}: "
                         f"{problem[0]}; nothing was changed", problem[1])
    if not steps:
        raise UsageError("--step-seconds without canary steps: there is nothing to time",
                         "add --canary 5,25,50, or steps = [5, 25, 50] in [env.*.canary]")
    return config.Canary(steps=steps, step_seconds=seconds)


def _mutate(cfg: config.Config, env: config.Environment, args: argparse.Namespace) -> int:
    from switcher import progress  # noqa: PLC0415
    from switcher.ops import recovery  # noqa: PLC0415

    # A live line on a terminal, plain lines otherwise; with --json, JSON events only.
    report = progress.for_stream(sys.stdout, as_json=getattr(args, "json", False))
    d = _deployer(cfg, env, say=report.say, progress=report,
                  lock_wait=getattr(args, "wait", None))
    if args.command in ("deploy", "rollback", "promote", "abort", "pause", "resume"):
        try:
            outcome = _operate(d, args)
        except SwitchError as exc:
            report.failed(args.command, exc.exit_code, exc.message, exc.hint)
            raise
        report.finished(outcome.to_json())
        return 0
    if args.command == "retire":
        d.retire(Color(args.color))
    elif args.command == "check":
        return _check(d, args.build)
    elif args.command == "repair":
        for line in recovery.repair(d):
            print(line)
        return 0
    else:
        raise UsageError(f"unknown command {args.command!r}", "see: alive-switch --help")
    return 0
