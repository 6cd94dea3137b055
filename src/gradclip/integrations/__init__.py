"""Integrations: clipping wired into training loops without changing them.

* :mod:`gradclip.integrations.optim`: ``attach(optimizer, clipper)`` clips before
  every ``optimizer.step()`` (any ``torch.optim`` optimizer), with the ``"skip"``
  non-finite policy and, for fused optimizers, the clip folded into the step.
* :mod:`gradclip.integrations.amp`: ``torch.amp.GradScaler`` support for it.
"""
