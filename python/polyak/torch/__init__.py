"""polyak.torch: averaged weights of a PyTorch model, every shadow updated by one C call.

    from polyak.torch import EMA
    ema = EMA(model, decay=0.9999, warmup=True)
    for step in range(1, num_steps + 1):
        ...; opt.step()
        ema.update(step)                    # enqueued on torch's current stream; no host sync
    with ema.average_parameters():          # the params are the average inside, as they were after
        evaluate(model)
    ema.save("ema.safetensors")             # safetensors.torch.load_file gives the averaged weights

The library reads the params where they live (CPU memory or a CUDA device)
through their data pointers; nothing here computes an average. Buffers: the
f32/bf16/f16 ones (BatchNorm's running statistics) are averaged like params by
default, the others (num_batches_tracked, float64 ones) registered as the
library's copy-only tensors, mirrored by the same update call; buffers="copy"
copies all of them, "ignore" leaves them out.
"""
from .bn import update_bn
from .ema import EMA
from .state import IncompatibleKeys

__all__ = ["EMA", "update_bn", "IncompatibleKeys"]
