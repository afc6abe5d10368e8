"""The kernel layer: the fused ops (ops/: validation, torch.library registration, autograd, public function), their
backends (torch_*, triton_*, the C++/CUDA extensions via backends.py), the plain reference math and the Triton
compile check. Imports torch and triton only."""
