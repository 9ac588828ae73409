"""The node <-> slave protocol, as pure state machines (no I/O, no trio): the messages
both sides share (``messages``), the node's side of a slave's session
(``node_session``) and the slave's side (``slave_session``).  docs/protocol.md has the
wire format.  Import the module you need: the slave never loads the node's side."""
