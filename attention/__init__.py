"""Varlen, ring and Brick Attention and the Brick planner (built by the attention issue)."""
