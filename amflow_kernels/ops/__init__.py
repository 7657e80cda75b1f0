"""One module per op: the public function, its torch.library registration, its kernels."""
