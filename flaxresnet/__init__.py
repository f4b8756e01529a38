"""flaxresnet: Keras-exact ResNet50/101/152 (and V2) in JAX/Flax, Keras weight conversion and fast fine-tuning."""

from flaxresnet.errors import UserError
from flaxresnet.models import (ResNet, ResNet50, ResNet50V2, ResNet101, ResNet101V2, ResNet152, ResNet152V2,
                               ResNetV2)
from flaxresnet.preprocess import preprocess_input, upsample
from flaxresnet.weights_file import load_converted

__all__ = ["ResNet", "ResNet50", "ResNet101", "ResNet152", "ResNetV2", "ResNet50V2", "ResNet101V2", "ResNet152V2",
           "UserError", "load_converted", "preprocess_input", "upsample"]
