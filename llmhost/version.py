"""The package version, in a module of its own so that code reporting it (the
system fingerprint) need not import the app factory."""

__version__ = "0.1.0"
