"""FlowServe on Ray: scaler ``ray`` and KV transport ``ray`` (see ``flowserve_ray.plugin``)."""
