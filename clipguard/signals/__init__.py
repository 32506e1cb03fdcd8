"""Signals: named per-pair measurements where higher means more suspicious.

A `Signal` says which columns it writes, where they live (a score folder for per-pair signals,
an audit folder for cross-pair ones) and how it flags (its main column above a threshold).
`SIGNALS` lists them all; `read_signal` reads one signal's main column for a set of pairs, so a
decision or a calibration can treat every signal alike.
"""

from clipguard.signals.base import Scope, Signal, SignalError, SignalValues
from clipguard.signals.registry import SIGNALS, get_signal, read_signal, signal_names

__all__ = ["SIGNALS", "Scope", "Signal", "SignalError", "SignalValues", "get_signal", "read_signal", "signal_names"]
