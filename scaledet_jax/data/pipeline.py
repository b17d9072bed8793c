"""Input pipelines: tfds ``coco/2017``, a local COCO-format folder, or the synthetic dataset.

TensorFlow runs on the host only (tf.data); batches come out as NumPy arrays of this process's
share of the global batch. With several hosts each reads its own shard
(``tfds.split_for_jax_process``). Training order is deterministic for a given seed, so a resumed
run skips exactly the batches it already consumed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import ml_collections
import numpy as np

from scaledet_jax.cli import UserError
from scaledet_jax.data import preprocess


def _hide_accelerators_from_tf() -> None:
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised or no such device type
        pass


def get_builder(data: ml_collections.ConfigDict, workdir: str):
    """The tfds builder for ``config.data``, prepared; a clear UserError when data is missing."""
    import tensorflow_datasets as tfds

    from scaledet_jax.data import coco_folder, synthetic

    if data.source == "synthetic":
        folder = data.coco_folder or os.path.join(workdir, "synthetic_data")
        synthetic.generate(folder, data.synthetic_train_images, data.synthetic_val_images, data.synthetic_seed)
        builder = coco_folder.CocoFolder(folder=folder)
        builder.download_and_prepare()
        return builder
    if data.source == "coco_folder":
        if not data.coco_folder or not coco_folder.split_names(data.coco_folder):
            raise UserError(
                f"no COCO-format data in {data.coco_folder or '(unset)'}: set --config.data.coco_folder to a folder "
                "with annotations/instances_<split>.json and the images in <split>/"
            )
        builder = coco_folder.CocoFolder(folder=data.coco_folder)
        builder.download_and_prepare()
        return builder
    if data.source == "tfds":
        data_dir = data.tfds_data_dir or None
        builder = tfds.builder(data.tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
            where = data.tfds_data_dir or os.path.expanduser("~/tensorflow_datasets")
            raise UserError(
                f"tfds dataset {data.tfds_name} is not prepared in {where}. Prepare it with "
                f"`tfds build {data.tfds_name.split('/')[0]} --data_dir={where}` (COCO zips in "
                f"{where}/downloads/manual for offline machines), or point --config.data.source=coco_folder "
                "--config.data.coco_folder=DIR at a COCO-format folder"
            )
        return builder
    raise UserError(f"unknown data.source {data.source!r}; use 'tfds', 'coco_folder' or 'synthetic'")


def normalization(config: ml_collections.ConfigDict) -> dict:
    """The input normalisation the model's weights expect (``config.model.input``)."""
    spec = config.model.get("input")
    if spec is None:
        return {}
    if spec.channels not in ("rgb", "bgr") or len(spec.mean) != 3 or len(spec.std) != 3:
        raise UserError(
            f"model.input must have channels 'rgb' or 'bgr' and 3 mean/std values, got "
            f"{spec.channels!r}, {tuple(spec.mean)}, {tuple(spec.std)}"
        )
    return {"mean": tuple(spec.mean), "std": tuple(spec.std), "bgr": spec.channels == "bgr"}


def label_map(data: ml_collections.ConfigDict):
    return preprocess.COCO_80_TO_91 if data.source == "tfds" and data.tfds_name.startswith("coco") else None


def train_batches(
    config: ml_collections.ConfigDict, builder, *, start_step: int = 0, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of ``train_batch_size / process_count`` examples."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    _hide_accelerators_from_tf()
    data = config.data
    if data.train_batch_size % process_count:
        raise UserError(f"train_batch_size {data.train_batch_size} does not divide over {process_count} hosts")
    per_host = data.train_batch_size // process_count
    split = tfds.even_splits(data.train_split, n=process_count, drop_remainder=True)[process_index]
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.shuffle(data.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True).repeat()
    base_seed = tf.constant([config.seed, process_index], tf.int64)

    def parse(index, example):
        seed = tf.random.experimental.stateless_fold_in(base_seed, index)
        return preprocess.preprocess(
            example,
            training=True,
            output_size=config.model.image_size,
            max_instances=data.max_instances,
            seed=seed,
            hflip=data.aug_rand_hflip,
            scale_min=data.aug_scale_min,
            scale_max=data.aug_scale_max,
            label_map=label_map(data),
            normalization=normalization(config),
        )

    ds = ds.enumerate().map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_host, drop_remainder=True).skip(start_step).prefetch(2)
    return iter(tfds.as_numpy(ds))


def eval_batches(
    config: ml_collections.ConfigDict, builder, *, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the eval split; the last batch is padded (``image_id`` -1) to keep shapes fixed."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    _hide_accelerators_from_tf()
    data = config.data
    per_host = data.eval_batch_size // process_count
    split = tfds.even_splits(data.eval_split, n=process_count)[process_index]
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(
        lambda ex: preprocess.preprocess(
            ex,
            training=False,
            output_size=config.model.image_size,
            max_instances=data.max_instances,
            label_map=label_map(data),
            normalization=normalization(config),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    for batch in tfds.as_numpy(ds.batch(per_host).prefetch(2)):
        n = len(batch["image_id"])
        if n < per_host:
            batch = {k: np.concatenate([v, np.zeros((per_host - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            batch["image_id"][n:] = -1
        yield batch
