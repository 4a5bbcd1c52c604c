"""Differential privacy: DP-SGD, DP aggregation, accounting, the privacy ledger.

Empty until the privacy issue lands; the folder exists because the design card names it.
"""
