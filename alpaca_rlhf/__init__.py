"""alpaca_rlhf: an RLHF pipeline (SFT, reward model / DPO, PPO) on DeepSpeed for LLaMA-family models."""
# First, before anything loads torch: let Intel MKL use the AVX-512 kernels of AMD processors that have them
# (cpu_blas.py says why and what it measured). Entry points import this package before torch.
from alpaca_rlhf import cpu_blas as _cpu_blas

_cpu_blas.apply()
