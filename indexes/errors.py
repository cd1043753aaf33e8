"""Errors of the storage layer. The CLI maps them to exit 2 (bad usage of a collection), one line each."""


class CollectionError(Exception):
    """A collection directory that cannot be used as asked (missing, corrupt, locked)."""


class ModelMismatch(CollectionError):
    """The collection was built with another model: vectors from two models are not comparable."""
