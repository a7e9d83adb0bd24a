"""The flow's choices, as plain data: how the condition enters and which blocks see it.

:class:`~nirdml.flow.ConditionalFlow` and config validation (``loss.nir.flow.*``) read these
tuples; nothing here imports torch (config errors stay quick).
"""

from __future__ import annotations

CONDITION_MODES = ("dense", "embed", "embed_per_block")
"""``condition``: the proxy itself to every conditioned block (the authors' default), one
shared embedder MLP, or one embedder per conditioned block."""
CONDITION_BLOCKS = ("all", "first", "middle", "last")
"""``condition_blocks``: which coupling blocks see the condition."""
