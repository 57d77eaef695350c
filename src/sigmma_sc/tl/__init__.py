"""Tools: training (fit), expression prediction, cross-modal retrieval and evaluation."""

from ._fit import fit
