"""Training-time methods: SPP (sparsity-preserving tuning), LoRA baselines, tuning data and the shared loop.

- ``spp.py``     SPP adapters (wrap frozen sparse linears, merge to the same sparsity pattern)
- ``lora.py``    LoRA baselines through ``peft`` (plain merge densifies, masked merge keeps the pattern)
- ``data.py``    instruction (Alpaca template, loss on the response) and packed plain-text datasets
- ``trainer.py`` the one training loop (``train``) and the ``TuningMethod`` hooks every method implements
"""
