"""TorchRec's planner: topology, constraints, plans and their JSON and description."""
