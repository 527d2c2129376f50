"""FlowServe's scalers that run each engine instance in its own process, and the base classes
of every scaler and instance handle (``target.TargetScaler``, ``instance.InstanceBase``)."""
