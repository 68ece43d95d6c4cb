"""Shared pieces of the sparse task-vector family (TIES, DARE, breadcrumbs and their kin),
grouped by what they are: parameter checks, selection (which entries survive), rescaling, the
sign-election combine, per-tensor band statistics for split tensors, and report statistics."""
