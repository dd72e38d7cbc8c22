"""The real-image check: scikit-learn's digits, a FLUX-transformer teacher trained here,
distilled end to end through ``mfcore-distill`` and scored by scikit-learn and SciPy.

Modules: :mod:`.data` (the digits as 16x16 one-channel latents and their class conditions),
:mod:`.teacher` (the class-conditional ``FluxTransformer2DModel`` trained by flow matching),
:mod:`.metrics` (class accuracy, Fréchet distance, k-NN precision and recall),
:mod:`.evaluate` (samples and scores of the teacher and a student), :mod:`.bench` (the
default benchmark) and :mod:`.grid` (the variants over seeds). Run
``python -m mfcore.toys.digits`` (see docs/digits.md).
"""
