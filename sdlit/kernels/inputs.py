"""Checks and small helpers shared by both divergence backends (PyTorch fallback and Triton)."""

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd")


def check_divergence_args(kind, beta, temperature):
    """Raise a clear ValueError for an unknown kind, beta outside [0, 1] or temperature <= 0."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def effective_kind(kind, beta):
    """TRL's JSD endpoints: jsd with beta 0 is forward KL(p || q), with beta 1 reverse KL(q || p)."""
    if kind == "jsd" and float(beta) == 0.0:
        return "forward_kl"
    if kind == "jsd" and float(beta) == 1.0:
        return "reverse_kl"
    return kind


def check_pair(student, teacher, what, last):
    """Student and teacher tensors of one shape, [N, last] or [B, T, last]."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_{what} {tuple(student.shape)} and teacher_{what} {tuple(teacher.shape)} must have the same shape"
        )
    if student.dim() not in (2, 3):
        raise ValueError(f"{what} must be [N, {last}] or [B, T, {last}], got shape {tuple(student.shape)}")


def row_mask(mask, leading_shape, device):
    """The mask as a flat bool tensor [N] on device (True = keep), or None when mask is None (keep all)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask must be a bool (or integer 0/1) tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(leading_shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the leading shape {tuple(leading_shape)}")
    return mask.reshape(-1).to(device).bool()


def kept_rows(mask, leading_shape, device):
    """Indices of the kept rows as a 1-D long tensor, or None when every row is kept (mask is None)."""
    flags = row_mask(mask, leading_shape, device)
    return None if flags is None else flags.nonzero().squeeze(-1)


def row_chunks(rows, n_rows, chunk_rows):
    """Chunks of at most chunk_rows kept rows: slices (views, no copy) when rows is None, else index tensors.

    Both index a tensor the same way: x[chunk] is a view for a slice and a copy for an index tensor.
    """
    chunk_rows = max(1, int(chunk_rows))
    if rows is None:
        return [slice(start, start + chunk_rows) for start in range(0, n_rows, chunk_rows)]
    return rows.split(chunk_rows)


def picked_logprobs(logits, token_ids, dtype):
    """log softmax(logits)[n, token_ids[n]] per row, [n] in ``dtype``, for one chunk of raw logits [n, V]."""
    x = logits.to(dtype)
    return x.gather(1, token_ids[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)


def no_autocast(tensor):
    """Autocast off on the tensor's device (inside a bf16-mixed training step, for example)."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)
