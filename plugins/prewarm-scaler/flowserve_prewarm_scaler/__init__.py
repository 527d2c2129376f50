"""FlowServe's scaler ``prewarm``: a pre-warmed process pool, DRAM pre-loading, fork-clone
from a zygote per model, and autoscaling. It builds on flowserve-instance-runtime (the
instance handle, the target scaler base, instance processes and the shared policy)."""
