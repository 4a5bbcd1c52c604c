"""Fast compute, each kernel tested against a plain-PyTorch reference.

Empty until the kernels issue lands; the folder exists because the design card names it.
"""
