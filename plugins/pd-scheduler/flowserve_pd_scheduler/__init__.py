"""FlowServe PD-disaggregation: prefill and decode tasks on separate instances."""
