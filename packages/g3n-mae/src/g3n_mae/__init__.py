"""BrainG3N 3D masked-autoencoder pretraining and encoding -> tokens shards.

Python API (the ``g3n-mae`` command is a thin layer over it):

* :mod:`g3n_mae.config`     presets (``paper``, ``tiny``, ``test``) and YAML loading
* :mod:`g3n_mae.model`      :class:`MAE3D`, patchify/unpatchify, size and FLOP formulas
* :mod:`g3n_mae.data`       z-scoring and the resumable rank/worker-split batch stream
* :mod:`g3n_mae.train`      the training loop (plain torch / DDP or DeepSpeed)
* :mod:`g3n_mae.checkpoint` safetensors checkpoints, export with model card, strict loading
* :mod:`g3n_mae.encode`     unmasked encoder over a ``volumes`` set -> ``tokens`` set
"""

__version__ = "0.1.0"
