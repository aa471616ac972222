"""One-shot pruning: sparsity specs and masks (`masks`), Hessian helpers (`hessian`) and the pruning methods
(`methods`: magnitude, Wanda, SparseGPT, APT)."""
