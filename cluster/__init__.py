"""Cluster: connecting to Ray clusters and the files to stand one up."""
