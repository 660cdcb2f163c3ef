#!/usr/bin/env python3
"""Convert a Keras ResNet50/101/152 or ResNet50V2/101V2/152V2 checkpoint to timm safetensors, without TensorFlow.

The same as `resnetv2-zoo convert` (options included: --bn-eps, --pooling, --preprocess, ...); the name table
lives in `resnetv2_zoo/keras/spec.py`, the mapping in `resnetv2_zoo/weights/convert.py`. Example:

    python converters/keras_to_safetensors.py resnet50v2_weights_tf_dim_ordering_tf_kernels.h5 -o resnet50v2_keras
"""
import sys

from resnetv2_zoo.cli import main

if __name__ == '__main__':
    sys.exit(main(['convert', *sys.argv[1:]]))
