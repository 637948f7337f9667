"""The One-Forcing training recipe (``python -m oneforcing.training <stage> --config FILE``), the synthetic world
(:mod:`.world`) and the demo model's components (:mod:`.demo_components`). See ``training/configs/README.md``."""
