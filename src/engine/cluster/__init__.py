"""Nodes that find each other, share their apps and balance requests (docs/cluster.md):
the pure balance table, app bundles, the cluster service and the verbs it adds."""
