"""Baselines the ViLD results are compared with."""
