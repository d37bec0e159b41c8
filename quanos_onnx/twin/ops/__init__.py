"""Op implementations; importing this package registers every op with the registry."""

from . import attention, elementwise, nn, quant, reduce, shape  # noqa: F401
