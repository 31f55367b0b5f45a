"""Metrics (AUC, GAUC, LogLoss in nats, NE) and the comparison report."""
