"""moekit.planner: expert placement planning (leaf layer: numpy + pulp, never torch)."""
