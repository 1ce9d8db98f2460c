"""Reverse tunnels from compute nodes to controllers (HTTP/2), container shell and web services."""
