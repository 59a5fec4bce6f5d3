"""Start a program with a listening socket passed the way systemd passes it (fd 3,
LISTEN_FDS=1, LISTEN_PID = its own PID), without booting systemd::

    subprocess.Popen([sys.executable, "-c", LAUNCH, str(sock.fileno()), program, *args],
                     pass_fds=[sock.fileno()])
"""

LAUNCH = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""
