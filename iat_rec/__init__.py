"""iat-rec: Instance-As-Token recommendation rankers on TorchRec."""

__version__ = "0.1.0"
# set by ``iat-rec --verbose``: every third-party warning shown; launched ranks inherit it
VERBOSE_ENV = "IAT_REC_VERBOSE"
