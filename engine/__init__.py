"""The Ray-free engine: request metadata, policies, the step scheduler core, messages, the model runner.

Nothing here imports Ray: the Serve shells in `deployments/` wrap these objects, and
the benchmark simulator drives the same scheduler with a virtual clock.
"""
