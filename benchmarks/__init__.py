"""Benchmarks of the router against a direct connection, HAProxy and systemd-socket-proxyd.

``benchmarks/run`` (or ``python -m benchmarks``) runs them all in one go on this machine:

    __main__.py   the command line and the order of the run; the only place that exits
    targets.py    nginx (the backend), the router in tcp and http mode, HAProxy (1 thread,
                  tcp and http), systemd-socket-proxyd: started on loopback ports of a fixed
                  block, fed their sockets the way systemd does, stopped by PID
    wrk.py        one wrk run (pinned to a core) → a Sample, read from a Lua ``done`` hook
    switching.py  switch latency on the router's control socket
    sandboxed.py  warm rollback and ``alive-switch status`` in a real systemd (the sandbox
                  of tests/system)
    report.py     medians, spreads, ratios → the markdown table and the JSON file
"""
