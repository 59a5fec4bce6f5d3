"""Mode "http": requests, not connections, go to the live color.

    wire.py      bytes, canned answers, the fast-path regexes, forwarding headers
    request.py   the rules a request head must pass; Request; Limits
    response.py  how a color's response is framed for the client
    proxy.py     Conn (a client connection) and Upstream (its connection to a color)
    pool.py      a color's idle connections, reused by the next request of any client
"""
