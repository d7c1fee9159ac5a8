"""Methods: each reads activations through the capture layer and produces a frozen artifact or result."""
