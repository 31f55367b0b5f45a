"""Batches (KJT) of both stages: the history index, the loaders and the batch makers."""
