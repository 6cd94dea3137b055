"""Experiments: training tasks that show what clipping does, and when it helps."""
