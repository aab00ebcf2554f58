"""4-bit NF4 bases (QLoRA / QFoRA). A quantized linear keeps its weight packed and rebuilds it in
forward; the core sees it only through ``fora.models.linear.is_packed_linear``."""
