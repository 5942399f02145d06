"""The round loop and its Flower layer: recording strategy, grids, client identities, the background writer."""
