"""The same black-box scenarios against every language's worker (issue #14)."""
