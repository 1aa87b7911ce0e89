"""Triton kernels, one file per family, each with the torch reference it is tested against beside it or named
in its docstring: ``scan`` (Vim's bidirectional selective scan), ``conv`` (its depthwise conv + SiLU), ``fusion``
(token fusion's matching and merge), ``norm`` (the residual add and RMSNorm in front of each layer)."""
