"""The node <-> slave protocol: the messages both sides share and each side's session,
as pure state machines (no I/O, no trio).  docs/protocol.md has the wire format."""
