"""The model families ``patch`` recognises, one module each: ``matches(model)`` (which family a model's
top-level structure says it is) and ``plan(model, bf16, problems)`` (the checks of everything that family's swaps
rely on, and the :class:`~.common.Plan` of those swaps, or None with ``problems`` filled)."""
from __future__ import annotations

from . import fastmetro, metro, tore_fastmetro, tore_metro
from .common import TRANSFORMER_LOOKED_FOR

FAMILIES = (tore_fastmetro, fastmetro, tore_metro, metro)
LOOKED_FOR = "; ".join(f.LOOKED_FOR for f in FAMILIES) + "; " + TRANSFORMER_LOOKED_FOR


def plan(model, bf16):
    """The :class:`~.common.Plan` for ``model``, or ValueError naming what was looked for and what is wrong."""
    problems: list[str] = []
    family = next((f for f in FAMILIES if f.matches(model)), None)
    result = None if family is None else family.plan(model, bf16, problems)
    if result is None:
        if family is None:
            problems.append("no transformer_1/2/3 or trans_encoder module")
        raise ValueError(f"patch: {type(model).__name__} is not a recognised model structure. Looked for: "
                         f"{LOOKED_FOR}. Found problems: {'; '.join(problems)}")
    return result

