"""The router: the data plane of one environment (``alive-switch-router STATE_DIR``).

It imports only :mod:`switcher.model`, :mod:`switcher.state` and :mod:`switcher.errors`
besides the standard library, uvloop and systemd-python, so it starts fast and stays small.
"""
