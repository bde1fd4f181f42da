"""Errors a user can fix: each message says what was wrong, where, and how to fix it."""


class PrefoptError(Exception):
    """Base class; the CLI prints these without a traceback."""


class RecipeError(PrefoptError, ValueError):
    """A recipe key is unknown, of the wrong type, missing, or inconsistent with another."""


class DataError(PrefoptError, ValueError):
    """A dataset cannot be read, or rows in it cannot be used."""
