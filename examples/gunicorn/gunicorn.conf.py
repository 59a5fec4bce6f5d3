# gunicorn settings for an app deployed by alive-switch (any mode; written for direct mode).
#
# The color unit passes $HOST and $PORT. On SIGTERM (systemd stopping a retired color)
# gunicorn stops accepting, lets workers finish their requests for graceful_timeout seconds,
# then exits: in direct mode that is the drain. Keep graceful_timeout below the unit's
# stop_timeout (TimeoutStopSec), or systemd kills what is left.
import os

bind = f"{os.environ['HOST']}:{os.environ['PORT']}"
backlog = 4096            # in direct mode the app's accept queue is the public one
workers = 2
graceful_timeout = 25     # < [env.*.unit] stop_timeout = 30
keepalive = 5             # idle keep-alive connections are closed after this long
