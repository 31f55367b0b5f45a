"""The token table: the sharded artifact, its health report, lookups for serving, the online compressor."""
