"""The app engine: manifests, apps, slave pools, drivers, node and CLI."""
