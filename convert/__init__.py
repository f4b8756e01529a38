"""Weight conversion between Keras ResNet files and flaxresnet files (`python -m convert ...`)."""
