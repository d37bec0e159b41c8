"""Bit allocation: the paper's Eqn 3 (eqn3), and the measured, budgeted alternative.

- eqn3: `k = k_init - round(ANS * k_init)`, its budgeted and iterative modes (the paper's
  method, `method="eqn3"`), unchanged.
- sensitivity: what each candidate bit-width of each layer costs, measured on calibration
  data with one calibration of ranges.
- solve: the exact integer program (scipy's HiGHS) that picks one bit-width per layer under
  one budget (average bits, bytes, energy on a hardware profile, BitOps), residual
  alignment as constraints, ANS as a weighted term.
- search: verify-and-repair against an accuracy guard, the smallest plan that keeps it,
  and a Pareto front over budgets.

Heavy imports (torch, scipy) happen inside the functions that need them.
"""

from .eqn3 import (
    K_INIT_MAX,
    K_MIN_FLOOR,
    allocate,
    allocate_budgeted,
    allocate_iterative,
    check_bit_range,
    eqn3_bits,
    round_half_away_from_zero,
)

__all__ = [
    "K_INIT_MAX",
    "K_MIN_FLOOR",
    "allocate",
    "allocate_budgeted",
    "allocate_iterative",
    "check_bit_range",
    "eqn3_bits",
    "round_half_away_from_zero",
]
