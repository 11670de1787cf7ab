"""Speed: the fastest way to run a Paella model on this device, chosen by measurement.

`benchmarks/sample_speed.py` measures every switch side by side against the published computation; the
defaults below are what won there (README, Performance):

- sampler: one batched forward for both CFG branches (``batch_cfg``), the conditioning's attention keys
  and values computed once per run (``cache``), and the inverse-CDF categorical step (``mode='cdf'``);
  the first two give the published tokens exactly (fp32), the third the same distribution;
- weights in bfloat16 on GPUs and on CPUs with native bf16 support (AVX512-BF16 / AMX), float32 elsewhere;
- optional ``torch.compile`` (on CUDA with CUDA graphs: mode 'reduce-overhead').
"""
import torch

# Sampler switches of `sample` that the pipelines use by default (the function's own defaults stay the
# published computation).
FAST_SAMPLING = dict(mode='cdf', batch_cfg=True, cache=True)
PUBLISHED_SAMPLING = dict(mode='multinomial', batch_cfg=False, cache=False)


def bf16_supported(device):
    """Whether bfloat16 matmuls run natively (and fast) on ``device``."""
    device = torch.device(device or 'cpu')
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    if device.type == 'cpu':
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def default_dtype(device):
    """bfloat16 where it is native, float32 elsewhere."""
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def resolve_dtype(dtype, device):
    """``'auto'`` -> `default_dtype`; a name ('bf16', 'fp32', 'float16') or a torch.dtype as is."""
    if dtype == 'auto':
        return default_dtype(device)
    names = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp32': torch.float32, 'float32': torch.float32,
             'fp16': torch.float16, 'float16': torch.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype must be 'auto', one of {sorted(names)} or a torch.dtype, got {dtype!r}")
        return names[dtype]
    return dtype


def compile_model(model, device=None):
    """torch.compile for inference: CUDA graphs on GPUs ('reduce-overhead'), weights frozen into the graph
    on CPUs. Returns a callable with the model's ``num_labels`` and ``prepare``."""
    device = torch.device(device or next(model.parameters()).device)
    if device.type == 'cpu':
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
    # The compiled module forwards attribute lookups (num_labels, prepare) to the model.
    return torch.compile(model, mode='reduce-overhead' if device.type == 'cuda' else None, dynamic=False)
