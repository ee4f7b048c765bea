"""The C-BPO method, the math only: losses, reference point, prior (gamma), method specs, configs
and epoch selection. Pure functions over tensors and arrays; knows nothing of models, Ray or the
registry database."""
