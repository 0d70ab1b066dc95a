"""kvframe plugin: network transports 'tcp' (plain sockets, zero-copy framing, a receiver thread) and
'shm' (tcp plus shared memory for large frames between processes proven to share a host).

Each transport lives in its own module, which is its entry point, so that looking up one name
imports only that module.  See README.md for the wire format and the same-host proof.
"""
