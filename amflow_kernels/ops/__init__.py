"""The ops, and what runs them.

- ``am_flow``, ``attention``, ``attention_colsum``, ``linear_attention``: the public functions; each checks its
  inputs (``amflow_kernels._validate``), picks a backend (``amflow_kernels._dispatch``) and maps
  the user's layout onto the kernels' (``amflow_kernels._layout``).
- ``registration``: every backend's fused ops as ``torch.library`` ops under one scheme of
  names, with their fake kernels and autograd.
- ``extension``: the compiled extension (csrc/, its CPU and CUDA kernels), loaded once.
- ``softmax_colsum_triton``, ``attention_triton`` and ``linear_attention_triton``: the Triton
  kernels and their launchers; ``softmax_colsum_tiles``: which tiles the softmax-colsum kernels may run;
  ``triton_device`` and ``autotune``: what the Triton launches depend on besides the shapes.
"""
