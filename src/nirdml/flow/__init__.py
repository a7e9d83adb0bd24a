"""The conditional normalizing flow of NIR: :class:`ConditionalFlow` (a conditional GLOW
flow, numerically the authors' FrEIA graph).

- :mod:`nirdml.flow.model`: the ``nn.Module`` and its public methods (``forward``,
  ``inverse``, ``nll``, ``sample``, ``load_freia_state_dict``);
- :mod:`nirdml.flow.coupling`: the GLOW coupling maths and its hand-written fused backward;
- :mod:`nirdml.flow.freia`: FrEIA's weight layout (the authors' initial draw, their
  state_dict import).
"""

from nirdml.flow.model import CONDITION_BLOCKS, CONDITION_MODES, ConditionalFlow

__all__ = ["CONDITION_BLOCKS", "CONDITION_MODES", "ConditionalFlow"]
