"""iat-rec: Instance-As-Token recommendation rankers on TorchRec."""

__version__ = "0.1.0"
