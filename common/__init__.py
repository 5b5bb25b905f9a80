"""The lowest layer: what every package may import and which imports none of them.

`frozen` (the base of every validated config), `paths` (where the checkout is),
`weight_sync` (the in-memory weight messages the trainer and the coder app both speak)
and `spmd` (N local gloo ranks and free ports, for tests, benchmarks and k8s snapshots).
Only the standard library, pydantic and torch are imported here.
"""
