"""meteora-jax: MeteoRA (many LoRA adapters as a per-token mixture of experts) in JAX / Flax NNX."""

from meteora_jax.api import from_pretrained
from meteora_jax.config import LlamaConfig, RopeScaling
from meteora_jax.llama import Llama, LlamaOutput

__all__ = ["LlamaConfig", "RopeScaling", "Llama", "LlamaOutput", "from_pretrained"]
__version__ = "0.1.0"
