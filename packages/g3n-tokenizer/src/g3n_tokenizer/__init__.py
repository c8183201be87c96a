"""g3n-tokenizer: BrainG3N phase 2 (docs/method.md §3) and the swappable tokenizer interface.

* :mod:`.interface`: the ``Tokenizer`` protocol every stage uses (encode/decode, latent shape,
  geometry, ``from_checkpoint``, ``model_ref``).
* :mod:`.registry`: tokenizers found through the entry-point group ``g3n.tokenizers``.
* :mod:`.mae_cnn`: frozen g3n-mae encoder -> Linear(1152, c) -> 3D CNN decoder (``mae-cnn``).
* :mod:`.autoencoderkl`: the MONAI AutoencoderKL baseline (``autoencoderkl``).
* :mod:`.train`, :mod:`.shardio`, :mod:`.sweep`, :mod:`.cli`: training, volumes <-> latents shards
  and NIfTI, the bottleneck sweep (Table 5), the ``g3n-tokenizer`` command.
"""

__version__ = "0.1.0"

from .errors import CheckpointError, LatentError, TokenizerError  # noqa: E402
from .interface import Tokenizer, check_latents, values_per_volume, zscore_brain  # noqa: E402
from .registry import GROUP, available, load_tokenizer  # noqa: E402

__all__ = [
    "CheckpointError", "GROUP", "LatentError", "Tokenizer", "TokenizerError", "available", "check_latents",
    "load_tokenizer", "values_per_volume", "zscore_brain", "__version__",
]  # fmt: skip
