"""mfcore's adapters: real diffusion transformers (FLUX, HunyuanImage 2.1 and 3.0) as
teachers and LoRA students, and the ``mfcore-distill`` entry point (docs/adapters.md).

The import path ``mfcore.adapters`` names this folder, ``adapters/`` at the repository's
root: ``pyproject.toml`` maps it with ``package-dir`` (and ``mfcore.toys`` to ``toys/``), so
the core package ``mfcore/`` never holds, and never imports, diffusers, peft or
transformers.
"""
