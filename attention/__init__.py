"""Attention for packed heterogeneous DiT batches: varlen backends, ring attention, Brick Attention, Brick planner.

- `attention.varlen`: packed sequences with cu_seqlens, output + LSE, backend registry.
- `attention.plan`: who holds which tokens (`BrickPlan`, `RingAssignment`).
- `attention.ring`: many rings in one SPMD call over torch.distributed (`brick_attention`, `ring_attention`).
- `attention.planner`: ring sizes and placement from a cost model (`plan_brick`).
"""
