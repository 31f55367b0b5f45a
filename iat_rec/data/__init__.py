"""The data path's start: schemas, the instance log, ingest and append, the synthetic and MovieLens logs, stats."""
