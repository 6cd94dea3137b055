"""Integrations: clipping wired into training loops without changing them.

* :mod:`gradclip.integrations.optim`: ``attach(optimizer, clipper)`` clips before
  every ``optimizer.step()`` (any ``torch.optim`` optimizer), with the ``"skip"``
  non-finite policy and, for fused optimizers, the clip folded into the step.
* :mod:`gradclip.integrations.amp`: ``torch.amp.GradScaler`` support for it.
* :mod:`gradclip.integrations.lightning`: the ``GradClip`` callback for PyTorch
  Lightning (``pip install 'gradclip[lightning]'``).
* :mod:`gradclip.integrations.transformers`: ``GradClipCallback`` for the Hugging Face
  ``Trainer``; :mod:`gradclip.integrations.accelerate`: ``clip_(accelerator, clipper)``
  (``pip install 'gradclip[hf]'``).

The framework adapters import their framework only when used: ``import gradclip``
loads none of them.
"""
