"""Damage to HDF5 structure that h5py reads without error but that would change the weights: refused."""
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from keras_helpers import write_legacy_h5

import resnetv2_zoo  # noqa: F401
from resnetv2_zoo.errors import KerasFileError
from resnetv2_zoo.weights.convert import convert_keras

ARCH = 'resnet50v2_keras'
KERNEL = 'conv3_block1_2_conv/conv3_block1_2_conv/kernel:0'


@pytest.fixture(scope='module')
def keras_h5(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return write_legacy_h5(timm.create_model(ARCH, num_classes=0).state_dict(), ARCH,
                           tmp_path_factory.mktemp('k') / 'w.h5', 'float16')


def _patched(keras_h5: Path, tmp_path: Path, edit) -> Path:
    data = bytearray(keras_h5.read_bytes())
    edit(data)
    path = tmp_path / 'damaged.h5'
    path.write_bytes(bytes(data))
    return path


def _address_field(data: bytearray, keras_h5: Path) -> int:
    with h5py.File(keras_h5, 'r') as h5:
        offset = h5[KERNEL].id.get_offset()
    packed = struct.pack('<Q', offset)
    assert data.count(packed) == 1  # the layout message's data address
    return data.find(packed)


@pytest.mark.parametrize('shift', [-32, -512, 2, 128])
def test_a_data_address_moved_into_structure_is_refused(keras_h5, tmp_path, shift):
    def move(data):
        at = _address_field(data, keras_h5)
        data[at:at + 8] = struct.pack('<Q', struct.unpack_from('<Q', data, at)[0] + shift)

    path = _patched(keras_h5, tmp_path, move)
    with h5py.File(path, 'r') as h5:  # control: HDF5 itself reads the moved values without complaint
        assert h5[KERNEL].shape == (3, 3, 128, 128) and np.isfinite(h5[KERNEL][()]).any()
    with pytest.raises(KerasFileError, match='overlap in the file') as info:
        convert_keras(path)
    assert str(path) in str(info.value) and KERNEL in str(info.value)


@pytest.mark.parametrize('norm, order', [(h5py.h5t.NORM_NONE, h5py.h5t.ORDER_LE),
                                         (h5py.h5t.NORM_IMPLIED, h5py.h5t.ORDER_BE)])
def test_non_ieee_float_datasets_are_refused(keras_h5, tmp_path, norm, order):
    path = tmp_path / 'odd_float.h5'
    path.write_bytes(keras_h5.read_bytes())
    with h5py.File(path, 'a') as h5:
        values = h5[KERNEL][()]
        del h5[KERNEL]
        ftype = h5py.h5t.IEEE_F16LE.copy()
        ftype.set_norm(norm)
        ftype.set_order(order)
        dataset = h5py.h5d.create(h5['conv3_block1_2_conv'].id, KERNEL.split('/', 1)[1].encode(), ftype,
                                  h5py.h5s.create_simple(values.shape))
        dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, values)  # HDF5 converts on write and back on read
        assert h5[KERNEL].dtype.kind == 'f'  # control: h5py presents it as an ordinary float dataset
    with pytest.raises(KerasFileError, match='not IEEE little-endian') as info:
        convert_keras(path)
    assert str(path) in str(info.value) and KERNEL in str(info.value)


def test_a_weight_names_attribute_that_is_not_strings_is_refused(keras_h5, tmp_path):
    path = tmp_path / 'vlen.h5'
    path.write_bytes(keras_h5.read_bytes())
    with h5py.File(path, 'a') as h5:
        group = h5['conv3_block1_2_conv']
        count = len(group.attrs['weight_names'])
        del group.attrs['weight_names']
        codes = np.empty(count, object)
        codes[:] = [np.arange(5, dtype=np.uint8)] * count
        group.attrs.create('weight_names', codes, dtype=h5py.vlen_dtype(np.uint8))
    with pytest.raises(KerasFileError, match="'weight_names' of /conv3_block1_2_conv is not stored as strings"):
        convert_keras(path)


def test_control_the_undamaged_file_converts(keras_h5):
    assert convert_keras(keras_h5).state_dict['stages.1.blocks.0.conv2.weight'].shape == (128, 128, 3, 3)


def test_a_flipped_string_type_bit_is_refused_not_a_crash(keras_h5, tmp_path):
    """One flipped byte turns a `weight_names` variable-length string into a variable-length sequence of an
    invalid type; h5py crashed the process (SIGSEGV) reading it."""
    def flip(data):
        at = data.find(b'weight_names\0\0\0\0\x19\x01')  # attribute name, padded; then vlen string type bits
        assert at > 0
        data[at + 17] ^= 0xCA

    path = _patched(keras_h5, tmp_path, flip)
    with pytest.raises(KerasFileError, match="attribute 'weight_names' of .* is not stored as strings") as info:
        convert_keras(path)
    assert str(path) in str(info.value)
