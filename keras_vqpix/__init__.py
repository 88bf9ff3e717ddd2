"""keras_vqpix: a VQ-VAE and Gated PixelCNN prior for ADNI brain MRI slices.

References:
  van den Oord et al. 2017, "Neural Discrete Representation Learning",
  https://arxiv.org/abs/1711.00937
  van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders",
  https://arxiv.org/abs/1606.05328
"""

__version__ = "0.1.0"
