"""Inspection of a node's interceptor: pinned maps, loaded programs, tc hooks, counters, and
the running agent's view over its admin socket.  Returns plain data; printing is the CLI's."""
