"""The slave side: the runtime a slave process runs (``python -m engine.worker``) and
the zygote that forks slaves.  Nothing here imports the node's side (``engine.pool``,
``engine.node``): a slave pays only for what it runs."""
