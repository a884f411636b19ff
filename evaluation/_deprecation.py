"""Old public names kept working for one release, each use warning with the name that replaced it.

Three shapes of rename, one helper each:

- a keyword argument: :func:`renamed_keywords` decorates the function;
- an attribute, property or method: :class:`DeprecatedAlias` in the class body;
- a key of a dict a result exports: :class:`RenamedKeysDict` answers ``summary[old]``.

Each shim records its rename in :data:`RENAMES` when its module is imported, so that a test can
check that README.md's ``## Changelog`` names every deprecated name with its replacement.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "RENAMES",
    "DeprecatedAlias",
    "RenamedKeysDict",
    "renamed_keys",
    "renamed_keywords",
    "warn_renamed",
]

#: ``(owner, old, new)`` of every rename a shim keeps working: owner is the class or function.
RENAMES: list[tuple[str, str, str]] = []


def warn_renamed(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Emit the ``DeprecationWarning`` of every rename: ``"<old> is deprecated: use <new>"``.

    ``stacklevel`` counts from the caller of this function (3: the caller of the shim).
    """
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=stacklevel)


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Decorator: each keyword ``old=`` in ``renames`` (``old="new"``) is passed on as ``new=``.

    The call warns once per old keyword used. Positions are unchanged by a rename, so positional
    calls need nothing.

    Raises:
        TypeError: (at call time) both the old and the new keyword are given.
    """

    def decorate(function: F) -> F:
        # ``Class.__init__`` is known by its class's name.
        owner = function.__qualname__.removesuffix(".__init__")
        RENAMES.extend((owner, old, new) for old, new in renames.items())

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{owner}() got both {old}= (deprecated) and {new}=")
                warn_renamed(f"{owner}({old}=...)", f"{new}=")
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


class DeprecatedAlias:
    """Class attribute that forwards an old attribute or method name to its new name.

    ``n_folds = DeprecatedAlias("num_folds")`` in a class body: reading (or, where the class
    allows it, setting) ``obj.n_folds`` warns and reads (sets) ``obj.num_folds``. A method alias
    returns the bound new method. It is not a dataclass field (it carries no annotation).
    """

    def __init__(self, new: str) -> None:
        self.new = new
        self.old = new  # set by __set_name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.old = name
        self.owner = owner.__name__
        RENAMES.append((self.owner, self.old, self.new))

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        warn_renamed(f"{self.owner}.{self.old}", f"{self.owner}.{self.new}")
        return getattr(instance, self.new)

    def __set__(self, instance: object, value: Any) -> None:
        warn_renamed(f"{self.owner}.{self.old}", f"{self.owner}.{self.new}")
        setattr(instance, self.new, value)


def renamed_keys(owner: str, **renames: str) -> dict[str, str]:
    """Record that ``owner``'s exported dict renamed each key ``old`` to ``new`` (``old="new"``)
    and return the mapping, for :class:`RenamedKeysDict`."""
    RENAMES.extend((owner, old, new) for old, new in renames.items())
    return renames


class RenamedKeysDict(dict):
    """A plain dict (its items, equality and JSON are those of the new keys) where indexing by
    an old key warns and returns the value of the new key.

    ``renames`` maps old key to new key. Only ``summary[old]`` is answered: ``get``, ``in`` and
    iteration see the new keys alone.
    """

    def __init__(self, items: Mapping[str, Any], renames: Mapping[str, str]) -> None:
        super().__init__(items)
        self.renames = dict(renames)

    def __missing__(self, key: str) -> Any:
        if key in self.renames:
            warn_renamed(f"the key {key!r}", repr(self.renames[key]))
            return self[self.renames[key]]
        raise KeyError(key)
