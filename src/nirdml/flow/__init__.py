"""The conditional normalizing flow of NIR: :class:`ConditionalFlow` (a conditional GLOW
flow, numerically the authors' FrEIA graph).

- :mod:`nirdml.flow.model`: the ``nn.Module`` and its public methods (``forward``,
  ``inverse``, ``nll``, ``sample``, ``load_freia_state_dict``);
- :mod:`nirdml.flow.coupling`: the GLOW coupling maths and its hand-written fused backward;
- :mod:`nirdml.flow.freia`: FrEIA's weight layout (the authors' initial draw, their
  state_dict import);
- :mod:`nirdml.flow.registry`: the flow's choices (torch-free, read by config validation).

The names are imported lazily (PEP 562), so config validation reads the torch-free choices
without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nirdml.runtime import lazy_attributes

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "CONDITION_BLOCKS": "nirdml.flow.registry",
    "CONDITION_MODES": "nirdml.flow.registry",
    "ConditionalFlow": "nirdml.flow.model",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from nirdml.flow.model import ConditionalFlow
    from nirdml.flow.registry import CONDITION_BLOCKS, CONDITION_MODES

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = ["CONDITION_BLOCKS", "CONDITION_MODES", "ConditionalFlow"]
