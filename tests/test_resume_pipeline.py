"""O(1) resume of the training input (issue 13 item 3): the batch at step k is a function of k alone.

Resuming at step k gives the k-th... batches of a fresh pipeline (every field), across an epoch boundary;
each epoch is a new order covering every example once; the global batch does not depend on the number of
processes; the TFRecord index reads the records TF's own reader reads, and a copy prepared as ArrayRecord
(tfds' data source) gives the same batches.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from test_bad_config import tiny_config

from scaledet_jax.data import coco_folder, pipeline

NUM_TRAIN = 12


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    config = tiny_config()
    config.data.synthetic_train_images = NUM_TRAIN
    config.data.train_batch_size = 5  # 12 examples: batches straddle epochs (steps 2, 4 cross a boundary)
    config.model.image_size = 64
    builder = pipeline.get_builder(config, str(tmp_path_factory.mktemp("work")))
    return config, builder


def _take(config, builder, steps, **kwargs):
    batches = pipeline.train_batches(config, builder, **kwargs)
    return [next(batches) for _ in range(steps)]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resume_at_step_k_gives_the_fresh_pipelines_batches_from_k(prepared):
    config, builder = prepared
    fresh = _take(config, builder, 7)
    resumed = _take(config, builder, 4, start_step=3)  # step 3 = positions 15..19: epoch 1 (12 examples)
    for a, b in zip(fresh[3:], resumed, strict=True):
        _assert_same(a, b)
    assert {"image", "boxes", "classes", "valid", "image_id"} <= fresh[0].keys()
    assert not np.array_equal(fresh[3]["image"], fresh[4]["image"])


def test_every_epoch_is_a_new_order_of_every_example(prepared):
    config, builder = prepared
    batches = _take(config, builder, 8)
    ids = np.concatenate([b["image_id"] for b in batches])  # 40 positions: 3 whole epochs
    epochs = [ids[e * NUM_TRAIN : (e + 1) * NUM_TRAIN].tolist() for e in range(3)]
    with open(builder.summary["train"]["json"]) as f:
        everything = sorted(image["id"] for image in json.load(f)["images"])
    assert len(everything) == NUM_TRAIN
    for order in epochs:
        assert sorted(order) == everything  # each example exactly once per epoch
    assert len({tuple(order) for order in epochs}) == 3  # and a different order each epoch
    assert epochs[0] != everything  # shuffled, not the file order
    # The same example in two epochs gets different augmentation (seed from the global position).
    repeat = ids.tolist().index(ids[0], 1)
    first = batches[0]["image"][0]
    again = batches[repeat // 5]["image"][repeat % 5]
    assert not np.array_equal(first, again)


def test_global_batch_is_the_same_for_one_and_two_processes(prepared):
    config, builder = prepared
    config = config.copy_and_resolve_references()
    config.data.train_batch_size = 6
    one = _take(config, builder, 3, start_step=1)
    two = [_take(config, builder, 3, start_step=1, process_index=i, process_count=2) for i in range(2)]
    for step in range(3):
        for key in one[step]:
            np.testing.assert_array_equal(
                one[step][key], np.concatenate([two[0][step][key], two[1][step][key]]), err_msg=key
            )


def test_tfrecord_index_reads_what_tf_reads(prepared):
    _, builder = prepared
    records, how = pipeline.random_access_source(builder, "train[2:11]")
    assert "tfrecord" in how
    instructions = builder.info.splits["train[2:11]"].file_instructions
    expected = []
    for instruction in instructions:
        ds = tf.data.TFRecordDataset(str(instruction.filename)).skip(instruction.skip).take(instruction.take)
        expected += [r.numpy() for r in ds]
    assert len(records) == len(expected) == 9
    assert [records[i] for i in range(len(records))] == expected


def test_array_record_copy_gives_the_same_batches(prepared, tmp_path):
    config, builder = prepared
    folder = os.path.dirname(os.path.dirname(builder.summary["train"]["json"]))  # <folder>/annotations/x.json
    copy = coco_folder.CocoFolder(folder=folder, data_dir=str(tmp_path), file_format="array_record")
    copy.download_and_prepare()
    _, how = pipeline.random_access_source(copy, "train")
    assert "array_record" in how
    for a, b in zip(_take(config, builder, 3, start_step=2), _take(config, copy, 3, start_step=2), strict=True):
        _assert_same(a, b)


def test_without_random_access_the_stream_is_used(prepared, monkeypatch):
    config, builder = prepared
    monkeypatch.setattr(pipeline, "random_access_source", lambda builder, split: (None, "test"))
    fresh = _take(config, builder, 3)
    resumed = _take(config, builder, 1, start_step=2)
    _assert_same(fresh[2], resumed[0])
