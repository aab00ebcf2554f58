"""The methods FoRA is compared with, each in its own module: DoRA, AdaLoRA, FIM-LoRA's rank
pattern and CKA layer scores. They build on the core (``fora.lora``, ``fora.fisher``,
``fora.selection``); the core imports none of them."""
