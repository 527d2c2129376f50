"""FlowServe's scalers that run each engine instance in its own process."""
