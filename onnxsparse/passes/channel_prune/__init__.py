"""``channel-prune``: remove whole channels and everything that depends on them, so the model shrinks.

- ``groups``: the coupled producers (a group) and the channels removed together (a unit);
- ``importance``: how much each channel matters (weights, activations, output energy, reconstruction);
- ``budget``: what a removal saves (channels, MACs, measured time) and how channels are spread within it;
- ``exact``: zero-only exactness, constants folded into the readers of a removed channel;
- ``edit``: the pruned copy, re-inferred shapes and the least-squares refit of the readers;
- ``prune``: the pass itself.

The coupling analysis and the graph edits themselves are :mod:`onnxsparse.channels`.
"""

from .prune import ChannelPrune

__all__ = ["ChannelPrune"]
