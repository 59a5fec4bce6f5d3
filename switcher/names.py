"""Every name of one environment, declared once: units, timers, the lock, the control socket.

For ``app = "alive"`` and the environment ``production``::

    alive-production.socket                  the public port, held by systemd
    alive-production.service                 the router
    alive-production@.service                the color template; @blue / @green its instances
    alive-production@blue.service.d/color.conf   a color's drop-in
    alive-production-retire-blue.timer       a standby color's retirement (+ .service)
    alive-production-takeover.service        a takeover's stand-in router (same-name takeovers)
    alive-production-cutover.service         the cut-over PID 1 runs during a takeover
    /run/alive-switch/alive-production.lock  the environment's lock
    /run/alive-switch/alive-production/control.sock   the router's control socket

Locks and control sockets live in /run/alive-switch, not in a RuntimeDirectory=, which
systemd wipes whenever its unit restarts. Pure and import-light: ``status`` and ``rollback``
name units without Jinja2.
"""

from __future__ import annotations

from dataclasses import dataclass

from switcher.model import Color

RUN_DIR = "/run/alive-switch"
DROPIN = "color.conf"


@dataclass(frozen=True)
class Names:
    app: str
    env: str

    @property
    def prefix(self) -> str:
        return f"{self.app}-{self.env}"

    @property
    def socket(self) -> str:
        return f"{self.prefix}.socket"

    @property
    def router(self) -> str:
        return f"{self.prefix}.service"

    @property
    def template(self) -> str:
        return f"{self.prefix}@.service"

    def color(self, color: Color) -> str:
        return f"{self.prefix}@{color.value}.service"

    def dropin(self, color: Color) -> str:
        """Relative to the unit directory."""
        return f"{self.color(color)}.d/{DROPIN}"

    def retire(self, color: Color) -> str:
        """The transient retire timer and its service, without the suffix."""
        return f"{self.prefix}-retire-{color.value}"

    @property
    def takeover_router(self) -> str:
        return f"{self.prefix}-takeover.service"

    @property
    def cutover(self) -> str:
        """The transient unit of a takeover's cut-over, without the suffix."""
        return f"{self.prefix}-cutover"

    @property
    def units(self) -> list[str]:
        """Every long-lived unit, the socket first (stopping in this order lets nothing new
        arrive while the rest stops)."""
        return [self.socket, self.router, self.takeover_router,
                *(self.color(c) for c in Color)]

    @property
    def lock(self) -> str:
        return f"{RUN_DIR}/{self.prefix}.lock"

    @property
    def control_socket(self) -> str:
        return f"{RUN_DIR}/{self.prefix}/control.sock"
