"""Plain configuration records (dataclasses) to and from dicts, strictly."""

from __future__ import annotations

import dataclasses


def record_from_dict(cls, d: dict):
    """``cls(**d)`` validated: unknown or missing keys are a ValueError naming them."""
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    for key in d:
        if key not in names:
            raise ValueError(f"{cls.__name__}: unknown key {key!r} (known: {sorted(names)})")
    for field in fields:
        if (field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
                and field.name not in d):
            raise ValueError(f"{cls.__name__}: missing required key {field.name!r}")
    record = cls(**d)
    record.validate()
    return record
