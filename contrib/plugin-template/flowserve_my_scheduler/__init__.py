"""flowserve-my-scheduler: the FlowServe batch scheduler 'my-scheduler'. The hook implementations are in ``plugin``."""
