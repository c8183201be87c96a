"""Errors of g3n-tokenizer; every message names the file or sample and the reason."""


class TokenizerError(ValueError):
    """A tokenizer cannot be found, built or used as asked."""


class CheckpointError(TokenizerError):
    """A tokenizer checkpoint is missing, corrupt, of another format, or does not match its digest."""


class LatentError(TokenizerError):
    """Latents have the wrong shape, contain NaN/Inf, or do not belong to this tokenizer."""
