"""Run configuration and the training loop both stages share."""
