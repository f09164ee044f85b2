"""Loaders for site data: manifests, images and built-in datasets."""
