"""End-to-end fault injection (issue 12): real processes, every accepted request
answered exactly once, no process left behind."""
