"""Nodes that find each other, share their apps and balance requests (docs/cluster.md):
the pure balance table, app bundles, the cluster service, and what a node started in a
cluster gains (:func:`engine.cluster.verbs.in_cluster`).  Importing any of it changes no
node: only the code that starts a node puts it in a cluster."""
