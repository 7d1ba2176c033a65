"""The storage-agnostic core: every policy of the layer lives here, no storage code."""
