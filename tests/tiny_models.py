"""Tiny models shared by the export tests."""

import torch


def mbf_tiny_at_trained_scale():
    """An untrained mbf_tiny at 32x32, in eval mode, whose BatchNorm statistics are randomized so that its activations
    have a trained network's scale (quantization and parity gates then see realistic ranges)."""
    from edgekd.models import create_model

    torch.manual_seed(0)
    model = create_model("mbf_tiny", input_size=32)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()
