"""BrainG3N's shipped models: CPU-trained demonstration weights for the demo geometry (80x96x80, 2 mm).

The package holds data, not code that needs torch: each model is a folder of safetensors files
with its model card (``card.json``, ``card.md``), the config it was trained with and the command
that rebuilds it, and ``weights/manifest.json`` lists every file's SHA-256. Stage packages load
the files with their own loaders; this package finds them and checks they are the files shipped.
"""

from .zoo import INTENDED_USE, ZooError, ZooModel, get, manifest, model_names, root, verify

__all__ = ["INTENDED_USE", "ZooError", "ZooModel", "get", "manifest", "model_names", "root", "verify"]
__version__ = "0.1.0"
