"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations


class FedEmbedError(Exception):
    """A mistake in user input or configuration, explained in one line."""


class DataError(FedEmbedError):
    """Bad site data: a manifest, image, text or label that cannot be used (names file/row/field)."""


class CacheError(FedEmbedError):
    """An embedding cache entry that is missing, corrupt or inconsistent."""


class ConfigError(FedEmbedError):
    """An invalid configuration value (run-config, node-config, CLI flag or saved head config)."""


class PrivacyError(FedEmbedError):
    """A privacy setting that would not give a valid guarantee, or an exhausted budget."""
