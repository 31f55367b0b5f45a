"""torch.nn modules for iat-rec: MLP, interaction blocks, SIT, sequence readers, query."""
