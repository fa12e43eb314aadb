"""Base class of the detectors' ``__slots__`` records, for one pickle format
in both builds of the package (see :mod:`detectors`).

Interpreted, a ``__slots__`` object pickles as ``(None, {slot: value})``;
compiled with mypyc, a native class would pickle as ``{attr: value}``, which
the other build cannot load.  :class:`Record` states the interpreted form for
both, so a snapshot taken by either build restores in the other (and older
interpreted snapshots still load).

>>> import pickle
>>> from detectors.reliability import HashWindow
>>> w = HashWindow(2); w.add(1.0, True)
>>> w.__getstate__()
(None, {'head': 1, 'size': 1, 't': array('q', [-1001, 0])})
>>> pickle.loads(pickle.dumps(w)).count(60.0, 1.0)
(1, 1)
"""

from __future__ import annotations

import copyreg
from typing import Any, Final, Self

_NAMES: dict[type, tuple[str, ...]] = {}
_UNSET: Final = object()


def attr_names(cls: type) -> tuple[str, ...]:
    """The instance attributes of a record class (its slots, bases' included)."""
    names = _NAMES.get(cls)
    if names is None:
        # compiled (mypyc): the native class lists its attributes itself
        mypyc_attrs = getattr(cls, "__mypyc_attrs__", None)
        names = (tuple(mypyc_attrs) if mypyc_attrs is not None
                 else tuple(copyreg._slotnames(cls)))  # type: ignore[attr-defined]
        _NAMES[cls] = names
    return names


class Record:
    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # compiled, a native class's __new__ would run __init__ (which needs
        # arguments); pickle creates the object empty, then sets its state
        return super().__new__(cls)

    def __getstate__(self) -> tuple[None, dict[str, Any]]:
        state: dict[str, Any] = {}
        for k in attr_names(type(self)):
            v = getattr(self, k, _UNSET)
            if v is not _UNSET:  # never set: pickle leaves such slots out too
                state[k] = v
        return None, state

    def __setstate__(self, state: tuple[None, dict[str, Any]]) -> None:
        for k, v in state[1].items():
            setattr(self, k, v)
