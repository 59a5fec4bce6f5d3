"""The router: the data plane of one environment (``alive-switch-router STATE_DIR``).

It imports only :mod:`switcher.model`, :mod:`switcher.state` and :mod:`switcher.errors`
besides the standard library, uvloop and systemd-python, so it starts fast and stays small.

    __main__.py    the entry point, the only place it exits
    server.py      lifecycle: startup → serve → shutdown, control commands, STATUS=
    routes.py      the routing table: the serving color, the fallback, one account per color
    tcp.py         mode tcp: one forwarded connection (Link + Upstream)
    http/          mode http: wire (bytes), request (head rules), response (framing),
                   proxy (Conn + Upstream)
    activation.py  what systemd passes and is told (LISTEN_FDS, sd_notify)
    control.py     the control socket
"""
