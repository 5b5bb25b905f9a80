"""The lowest layer: what every package may import and which imports none of them.

`frozen` (the base of every validated config), `paths` (where the checkout is) and
`weight_sync` (the in-memory weight messages the trainer and the coder app both speak).
Only the standard library, pydantic and torch are imported here.
"""
