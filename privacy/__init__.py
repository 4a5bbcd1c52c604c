"""Differential privacy: DP-SGD, DP aggregation, accounting and the privacy ledger (not built yet)."""
