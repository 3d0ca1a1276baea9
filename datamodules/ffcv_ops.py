"""visionlab's own FFCV pipeline operations: a decoder of sample indices, and FFCV's random-resized crop and
horizontal flip drawn for each sample from a seeded stream so that a seeded run repeats.

FFCV 1.0.2's ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from numba's per-thread RNG,
which neither ``seed_everything`` nor the loader's ``seed`` reaches, and whose draws land on whichever decoding
thread runs a sample: two runs of one config train on different crops. ``SeededRandomResizedCrop`` makes the same
draws (FFCV's own ``get_random_crop``: 10 tries of a scale/log-ratio box, then the centre fallback; then a flip with
``flip_prob``) after reseeding numba's RNG for each sample from the epoch's seed (``step_seed`` of seed, rank and
epoch, as the device augmentation uses) and the position in the epoch's order. The distribution of crops and flips is FFCV's; only where they come from changes.

The epoch changes without recompiling: numba freezes arrays it sees as globals, so the state lives in a small
``int64`` array whose address the compiled decoder reads (``AugmentationSeed``), and the loader writes the epoch's
seed there before each epoch starts.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic

from datamodules.augment import step_seed

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@intrinsic
def _load_int64(typingctx, address):
    """The int64 stored at ``address`` (a plain load: the value may change between calls)."""

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], context.get_value_type(types.int64).as_pointer())
        return builder.load(pointer)

    return types.int64(types.intp), codegen


def _splitmix(x):
    """splitmix64's finaliser: a bijection of uint64 whose output bits each depend on every input bit."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _flip_in_place(image):
    width = image.shape[1]
    for row in range(image.shape[0]):
        for column in range(width // 2):
            for channel in range(image.shape[2]):
                kept = image[row, column, channel]
                image[row, column, channel] = image[row, width - 1 - column, channel]
                image[row, width - 1 - column, channel] = kept


class AugmentationSeed:
    """The epoch's seed that ``SeededRandomResizedCrop`` draws from (the device augmentation's ``step_seed`` of
    (seed, rank, epoch)), in memory its compiled code reads.

    Keep this object alive as long as the loader that uses it (the decoder holds it).
    """

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank, self._epoch = seed, rank, 0
        self.cell = np.array([step_seed(seed, rank, 0, 0)], dtype=np.int64)

    @property
    def address(self) -> int:
        return int(self.cell.ctypes.data)

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = value
        self.cell[0] = step_seed(self.seed, self.rank, value, 0)


def seeded_random_resized_crop(output_size, scale, ratio, flip_prob: float, seed: AugmentationSeed):
    """A ``SeededRandomResizedCrop`` (built here so that importing this module does not need FFCV)."""
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCrop(RandomResizedCropRGBImageDecoder):
        """FFCV's ``RandomResizedCropRGBImageDecoder`` (plus the horizontal flip) drawing from a seeded stream per
        sample; its decode loop is FFCV's with the reseed before the draws and the flip after the resize."""

        def __init__(self):
            super().__init__(output_size, scale=scale, ratio=ratio)
            self.flip_prob, self.seed = float(flip_prob), seed

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read, my_range = self.memory_read, Compiler.get_iterator()
            imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
            get_crop_c, mix_c = Compiler.compile(get_random_crop), Compiler.compile(_splitmix)
            flip_c = Compiler.compile(_flip_in_place)
            crop_scale, crop_ratio = np.array(self.scale), np.array(self.ratio)
            address, flip_p = self.seed.address, self.flip_prob

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                # the epoch's seed, the batch's first sample and the position in it: the k-th sample of the
                # epoch's order, so that the copies of one image in a batch or epoch (repeated augmentation) differ
                state = mix_c(np.uint64(_load_int64(address)) ^ np.uint64(batch_indices[0]))
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    sample = mix_c(state ^ (np.uint64(dst_ix) * _GOLDEN) ^ np.uint64(source_ix))
                    np.random.seed(np.uint32(sample >> np.uint64(32)))  # this thread's numba RNG
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    i, j, h, w = get_crop_c(height, width, crop_scale, crop_ratio)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                    if flip_p > 0 and np.random.uniform(0.0, 1.0) < flip_p:
                        flip_c(destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededRandomResizedCrop()


def index_decoder():
    """An FFCV decoder for any scalar field that outputs the sample's index in the ``.beton`` instead of its value.

    Use it in an extra pipeline, e.g. ``PipelineSpec("label", decoder=index_decoder(), transforms=[ToTensor(),
    Squeeze()])``; the indices are global ``.beton`` indices, also under ``distributed=True`` sharding.
    """
    from ffcv.fields.basics import IntDecoder

    class IndexDecoder(IntDecoder):
        def generate_code(self):
            def decode(indices, destination, metadata, storage_state):
                for position, sample_id in enumerate(indices):
                    destination[position] = sample_id
                return destination[:len(indices)]

            return decode

    return IndexDecoder()


def index_pipeline():
    """The ``index`` entry of a pipelines dict: each sample's position in the ``.beton`` (``index_decoder``)."""
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import Squeeze, ToTensor

    return PipelineSpec("label", decoder=index_decoder(), transforms=[ToTensor(), Squeeze()])
