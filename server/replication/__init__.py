"""Replication: published versions of a collection, and replicas that follow them."""
