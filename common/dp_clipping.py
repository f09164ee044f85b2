"""Work-around for Flower 1.41's DP clipping, which scales 0-d arrays out of place and so never clips them.

``flwr.supercore.differential_privacy.clip_inputs_inplace`` does ``array *= factor`` on the update of
each array; for a 0-d array that update is a numpy scalar, so a scalar parameter (InfoNCE's learnable
temperature) passes through unclipped and the clipped update can exceed the clipping norm. Both
``fixedclipping_mod`` (client/clipping.py) and the server-side wrapper (server/privacy.py) therefore
see 0-d arrays as shape (1,) and get them back in their own shape afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Array, ArrayRecord


def record_shapes(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """The shape of every array in ``record``, by name."""
    return {name: tuple(array.shape) for name, array in record.items()}


def lift_scalars(record: ArrayRecord) -> ArrayRecord:
    """``record`` with every 0-d array as shape (1,): same names, order and values."""
    return ArrayRecord(
        {
            name: Array(array.numpy().reshape(1)) if not array.shape else array
            for name, array in record.items()
        }
    )


def restore_shapes(record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> ArrayRecord:
    """``record`` with each array reshaped to ``shapes[name]`` (undoes ``lift_scalars``)."""
    return ArrayRecord(
        {
            name: array
            if tuple(array.shape) == shapes[name]
            else Array(array.numpy().reshape(shapes[name]))
            for name, array in record.items()
        }
    )
