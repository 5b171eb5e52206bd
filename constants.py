"""constants.py: the numbers every layer shares, at the bottom of the import graph (it imports nothing).

The models (encoder, decoder, dinov2, vggt) read these here rather than from the data readers.
"""

# The ViT patch size of DA3 (and DINOv2, VGGT): images are multiples of it, tokens are h x w patches.
PATCH = 14

# The normalisation of DA3's input images and of the release decoder's output.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The latent encoder of the bundled models (weights/tiny): a DA3 of our own, trained on the synthetic scenes.
DEFAULT_ENCODER = 'da3-tiny'
