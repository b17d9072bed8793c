"""Input pipelines: tfds ``coco/2017`` or ``voc/2007`` / ``voc/2012``, a local COCO-format or PASCAL VOC-format
folder, or the synthetic dataset (written as a COCO or a VOC folder).

TensorFlow runs on the host only (tf.data); batches come out as NumPy arrays of this process's
share of the global batch.

Training examples are read by index (``train_batches``): the global stream is epoch after epoch of the
training split, each epoch a fresh permutation of all its examples seeded by (``seed``, epoch), and the
augmentation of the example at global position p is seeded by (``seed``, p). The batch at step k is a
function of k alone, whatever the number of hosts (each reads its own rows of it) and however the run got
there, so a resumed run starts reading at step k directly: nothing is replayed or decoded twice.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from collections.abc import Iterator

import ml_collections
import numpy as np
from absl import logging

from scaledet_jax.cli import UserError
from scaledet_jax.data import preprocess


def _hide_accelerators_from_tf() -> None:
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised or no such device type
        pass


def needs_masks(config: ml_collections.ConfigDict) -> bool:
    """Whether the model trains on instance masks (batches then carry ``masks``)."""
    return config.model.name == "mask_rcnn"


def mask_crop_size(config: ml_collections.ConfigDict) -> int:
    """K of the ``masks`` [M, K, K] in a batch (``data.mask_crop_size``, Model Garden's 112 by default)."""
    return int(config.data.get("mask_crop_size", 112))


def get_builder(config: ml_collections.ConfigDict, workdir: str):
    """The tfds builder for ``config.data``, prepared and checked against ``config.model``; a one-line
    UserError when the data is missing, malformed or does not fit the model (``check_dataset``)."""
    import tensorflow_datasets as tfds

    from scaledet_jax.data import coco_folder, synthetic

    data = config.data
    synthetic_format = data.get("synthetic_format", "coco")
    if data.source == "synthetic" and synthetic_format not in ("coco", "voc"):
        raise UserError(f"unknown data.synthetic_format {synthetic_format!r}; use 'coco' or 'voc'")
    if data.source == "synthetic" and synthetic_format == "voc":
        folder = data.get("voc_folder", "") or os.path.join(workdir, "synthetic_voc")
        try:
            synthetic.generate_voc(folder, data.synthetic_train_images, data.synthetic_val_images, data.synthetic_seed)
        except OSError as e:
            raise UserError(
                f"cannot write the synthetic VOC dataset to {folder}: {e.strerror or e}; use a writable workdir or "
                "set --config.data.voc_folder to a writable folder"
            ) from None
        return _prepare_voc(config, folder, workdir)
    if data.source == "voc_folder":
        return _prepare_voc(config, data.get("voc_folder", ""), workdir)
    if data.source == "synthetic":
        folder = data.coco_folder or os.path.join(workdir, "synthetic_data")
        try:
            synthetic.generate(
                folder,
                data.synthetic_train_images,
                data.synthetic_val_images,
                data.synthetic_seed,
                classes=data.get("synthetic_classes", ""),
            )
        except ValueError as e:
            raise UserError(f"data.synthetic_classes: {e}") from None
        except OSError as e:
            raise UserError(
                f"cannot write the synthetic dataset to {folder}: {e.strerror or e}; use a writable workdir or "
                "set --config.data.coco_folder to a writable folder"
            ) from None
        return _prepare_folder(config, folder, workdir)
    if data.source == "coco_folder":
        if not data.coco_folder or not coco_folder.split_names(data.coco_folder):
            raise UserError(
                f"no COCO-format data in {data.coco_folder or '(unset)'}: set --config.data.coco_folder to a folder "
                "with annotations/instances_<split>.json and the images in <split>/"
            )
        return _prepare_folder(config, data.coco_folder, workdir)
    if data.source == "tfds":
        if needs_masks(config):
            raise UserError(
                f"tfds {data.tfds_name} has no instance masks; train {config.model.name} on the COCO download as a "
                "COCO folder (--config.data.source=coco_folder --config.data.coco_folder=DIR holding train2017/ + "
                "annotations/instances_train2017.json)"
            )
        data_dir = data.tfds_data_dir or None
        builder = tfds.builder(data.tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
            where = data.tfds_data_dir or os.path.expanduser("~/tensorflow_datasets")
            if is_tfds_voc(data):
                raise UserError(
                    f"tfds dataset {data.tfds_name} is not prepared in {where}. Prepare it with `tfds build "
                    f"{data.tfds_name} --data_dir={where}`, or point --config.data.source=voc_folder "
                    "--config.data.voc_folder=DIR at a VOCdevkit year folder (e.g. VOCdevkit/VOC2007)"
                )
            raise UserError(
                f"tfds dataset {data.tfds_name} is not prepared in {where}. Prepare it with "
                f"`tfds build {data.tfds_name.split('/')[0]} --data_dir={where}` (COCO zips in "
                f"{where}/downloads/manual for offline machines), or point --config.data.source=coco_folder "
                "--config.data.coco_folder=DIR at a COCO-format folder"
            )
        ids = _tfds_category_ids(builder, data)
        if ids is not None:
            check_categories(config.model, ids, f"tfds {data.tfds_name}")
        return builder
    raise UserError(f"unknown data.source {data.source!r}; use 'tfds', 'coco_folder', 'voc_folder' or 'synthetic'")


def _prepare_folder(config: ml_collections.ConfigDict, folder: str, workdir: str):
    from scaledet_jax.data import coco_folder

    data = config.data
    return coco_folder.prepare(
        folder,
        cache_dir=data.get("cache_dir", ""),
        fallback_dir=os.path.join(workdir, "prepared_data"),
        skip_bad_images=data.get("skip_bad_images", False),
        check=lambda summaries: check_dataset(config, summaries),
    )


def _prepare_voc(config: ml_collections.ConfigDict, spec: str, workdir: str):
    """A VOC folder (or several, comma-separated) prepared with the train and eval splits of ``config``."""
    from scaledet_jax.data import voc_folder

    data = config.data
    folders = voc_folder.parse_folders(spec)
    available = voc_folder.split_names(folders)
    for key, preferred in (("train_split", ("trainval", "train")), ("eval_split", ("test", "val"))):
        split = data[key]
        if split not in available:
            other = data.eval_split if key == "train_split" else data.train_split
            suggestion = ([s for s in preferred if s in available and s != other] or available or ["train"])[0]
            raise UserError(
                f"data.{key}={split!r} is not a split of {', '.join(folders)} (it has "
                f"{', '.join(available) or 'no ImageSets/Main/<split>.txt'}): set --config.data.{key}={suggestion}"
            )
    return voc_folder.prepare(
        folders,
        [data.train_split, data.eval_split],
        classes=data.get("voc_classes", ""),
        cache_dir=data.get("cache_dir", ""),
        fallback_dir=os.path.join(workdir, "prepared_data"),
        skip_bad_images=data.get("skip_bad_images", False),
        check=lambda summaries: check_dataset(config, summaries),
    )


def check_dataset(config: ml_collections.ConfigDict, summaries: dict[str, dict]) -> None:
    """Refuses data that would train on nothing or on the wrong classes (one UserError line):
    a training json without ``annotations`` or without any object, a mask model's training json
    without any segmentation (every mask would be a filled box), and category ids of the train
    or eval split that the model has no output for (``check_categories``). ``summaries``: split ->
    ``coco_folder.SplitIndex.summary()``."""
    data = config.data
    train = summaries.get(data.train_split)
    if train is not None:
        if not train["has_annotations"]:
            raise UserError(
                f"{train['json']} has no 'annotations', so training on split {data.train_split!r} would learn "
                "nothing: add the annotations, or set --config.data.train_split to an annotated split"
            )
        if train["objects"] == 0:
            raise UserError(
                f"{train['json']} has no object to train on ({train['images']} images, {train['annotations']} "
                "annotations, none a non-crowd box of positive size): add annotations, or set "
                "--config.data.train_split to an annotated split"
            )
        if needs_masks(config) and train.get("segmentations", 1) == 0:
            raise UserError(
                f"{train['json']} has no instance masks (none of its {train['objects']} objects has a 'segmentation'), "
                f"so {config.model.name} would learn filled boxes as masks: add polygon or RLE segmentations, or "
                "train a box-only model (e.g. --config=configs/fasterrcnn_resnet50_fpn.py)"
            )
    used: dict[int, int] = {}
    files = []
    for split in dict.fromkeys((data.train_split, data.eval_split)):
        summary = summaries.get(split)
        if summary is None:
            continue
        files.append(os.path.basename(summary["json"]))
        for category, count in summary["category_ids"].items():
            used[int(category)] = used.get(int(category), 0) + count
    if used:
        check_categories(config.model, used, " and ".join(files))


def check_categories(model: ml_collections.ConfigDict, used: dict[int, int | None], where: str) -> None:
    """Every category id in ``used`` (id -> annotation count, or None when unknown) must have an output
    in the model's class layout, else it would train as background and still be scored as ground truth.

    Layouts: ``background_slot`` (output c is category c, 0 background: ids 1..num_classes-1; with
    ``category_ids`` output c >= 1 is category_ids[c - 1], mmdetection's two-stage heads);
    ``category_ids`` without background slot (output c is category_ids[c]); otherwise automl's
    (output c is category c + 1: ids 1..num_classes).
    """
    n = int(model.num_classes)
    ids = tuple(model.get("category_ids", ()) or ())
    if model.get("background_slot", True) and ids:  # two-stage mmdetection layout: output c is category_ids[c - 1]
        covered = set(ids)
        layout = f"model.category_ids has {len(ids)} ids (outputs 1..{len(ids)}, 0 background)"
        needed = None
    elif model.get("background_slot", True):
        covered = set(range(1, n))
        layout = f"model.num_classes={n} with the background slot 0 has outputs for ids 1..{n - 1}"
        needed = max(used) + 1
    elif ids:
        covered = set(ids)
        layout = f"model.category_ids has {len(ids)} ids"
        needed = None
    else:
        covered = set(range(1, n + 1))
        layout = f"model.num_classes={n} without a background slot has outputs for ids 1..{n}"
        needed = max(used)
    bad = sorted(c for c in used if c not in covered)
    if not bad:
        return
    listed = ", ".join(map(str, bad[:20])) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
    counts = [used[c] for c in bad]
    of = f"{sum(counts)} annotation{'s' * (sum(counts) != 1)} in {where}" if None not in counts else where
    fixes = []
    if bad[0] < 1 and not ids:
        fixes.append("number the categories from 1 (id 0 is background)")
    if needed is None:
        plus = " + 1" if model.get("background_slot", True) else ""
        fixes.append(
            f"add them to --config.model.category_ids (and set --config.model.num_classes to its length{plus})"
        )
    elif bad[-1] >= 1:
        fixes.append(f"set --config.model.num_classes={needed}")
    fix = " and ".join(fixes)
    raise UserError(
        f"category ids {listed} ({of}) have no output in the model ({layout}), so they would train as "
        f"background and still be scored: {fix}"
    )


def _tfds_category_ids(builder, data: ml_collections.ConfigDict) -> dict[int, None] | None:
    """The category ids a tfds dataset can hold (its ClassLabel, through ``label_map``), or None."""
    import tensorflow_datasets as tfds

    try:
        label = builder.info.features["objects"]["label"]
    except (KeyError, TypeError):
        return None
    if not isinstance(label, tfds.features.ClassLabel):
        return None
    mapping = label_map(data)
    return {(mapping[i] if mapping else i): None for i in range(label.num_classes)}


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


def is_tfds_voc(data: ml_collections.ConfigDict) -> bool:
    return data.source == "tfds" and data.tfds_name.split("/")[0] == "voc"


# tfds voc labels 0..19 -> category ids 1..20 (0 is the background slot), the ids of a VOC folder.
VOC_20_TO_CATEGORY = tuple(range(1, 21))


def label_map(data: ml_collections.ConfigDict):
    if data.source == "tfds" and data.tfds_name.startswith("coco"):
        return preprocess.COCO_80_TO_91
    return VOC_20_TO_CATEGORY if is_tfds_voc(data) else None


def voc_image_id(filename):
    """tfds voc's ``image/filename`` -> an int64 image id: the digits of ``000005.jpg`` / ``2008_000002.jpg``
    (5, 2008000002, the ids a VOC folder gets), a 62-bit hash of the name for any other name."""
    import tensorflow as tf

    stem = tf.strings.regex_replace(filename, r"\.[^.]*$", "")
    digits = tf.strings.regex_replace(stem, "_", "")
    numeric = tf.strings.regex_full_match(stem, r"[0-9]+(_[0-9]+)*") & (tf.strings.length(digits) <= 18)
    return tf.cond(
        numeric,
        lambda: tf.strings.to_number(digits, tf.int64),
        lambda: tf.strings.to_hash_bucket_fast(filename, 2**62),
    )


def coco_structure(ds, data: ml_collections.ConfigDict):
    """A tfds dataset's examples with the structure of ``coco/2017`` that the preprocessing reads: tfds voc
    gets ``image/id`` (``voc_image_id``) and ``objects/is_crowd`` = ``is_difficult`` (difficult objects are
    ignore regions, as crowd); other datasets pass unchanged."""
    import tensorflow as tf

    if not is_tfds_voc(data):
        return ds

    def standard(example):
        objects = example["objects"]
        return {
            "image": example["image"],
            "image/id": voc_image_id(example["image/filename"]),
            "image/filename": example["image/filename"],
            "objects": {"bbox": objects["bbox"], "label": objects["label"], "is_crowd": objects["is_difficult"]},
        }

    return ds.map(standard, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class TFRecordIndex:
    """Random access to the records of tfds TFRecord shards (``FileInstruction``s, skip/take honoured): the
    offset of every record, found once by reading only the 12-byte record headers (TFRecord framing: uint64
    length, uint32 crc of the length, the record, uint32 crc of the record). Thread-safe reads (``os.pread``;
    ``tf.io.gfile`` for remote paths)."""

    def __init__(self, instructions):
        starts, lengths, files = [], [], []
        self._paths = [str(instruction.filename) for instruction in instructions]
        for number, (path, instruction) in enumerate(zip(self._paths, instructions, strict=True)):
            file_starts, file_lengths = _record_offsets(path)
            if len(file_starts) != instruction.examples_in_shard:
                raise ValueError(
                    f"{path} holds {len(file_starts)} records, the dataset info says {instruction.examples_in_shard}"
                )
            stop = instruction.skip + instruction.take
            starts += file_starts[instruction.skip : stop]
            lengths += file_lengths[instruction.skip : stop]
            files += [number] * (stop - instruction.skip)
        self._starts = np.asarray(starts, np.int64)
        self._lengths = np.asarray(lengths, np.int64)
        self._files = np.asarray(files, np.int32)
        self._descriptors: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> bytes:
        number, start, length = int(self._files[index]), int(self._starts[index]), int(self._lengths[index])
        path = self._paths[number]
        if "://" in path:
            import tensorflow as tf

            with tf.io.gfile.GFile(path, "rb") as f:
                f.seek(start)
                return f.read(length)
        with self._lock:
            if number not in self._descriptors:
                self._descriptors[number] = os.open(path, os.O_RDONLY)
            descriptor = self._descriptors[number]
        return os.pread(descriptor, length, start)

    def __del__(self):
        for descriptor in getattr(self, "_descriptors", {}).values():
            os.close(descriptor)


def _record_offsets(path: str) -> tuple[list[int], list[int]]:
    """(start, length) of every record of a TFRecord file, from its headers alone (local files: one ``pread``
    of 12 bytes per record, 0.2-0.4 s for 118k COCO-sized records cached; ``tf.io.gfile`` for remote paths)."""
    import tensorflow as tf

    starts, lengths = [], []
    size = tf.io.gfile.stat(path).length
    remote = "://" in path
    with tf.io.gfile.GFile(path, "rb") if remote else open(path, "rb", buffering=0) as f:
        position = 0
        while position < size:
            if remote:
                f.seek(position)
                header = f.read(12)
            else:
                header = os.pread(f.fileno(), 12, position)
            if len(header) != 12:
                raise ValueError(f"{path} is not a TFRecord file (truncated header at byte {position})")
            (length,) = struct.unpack("<Q", header[:8])
            starts.append(position + 12)
            lengths.append(length)
            position += 12 + length + 4
    if position != size:
        raise ValueError(f"{path} is not an uncompressed TFRecord file (records overrun its {size} bytes)")
    return starts, lengths


def random_access_source(builder, split: str) -> tuple[object | None, str]:
    """(records, how) where ``records[i]`` is the serialized i-th example of ``split`` (the order of
    ``as_dataset(shuffle_files=False)``), or (None, why not). ArrayRecord files: tfds' data source; TFRecord
    files (tfds' default, ``coco/2017`` as ``tfds build`` writes it, our prepared folders): ``TFRecordIndex``."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    file_format = builder.info.file_format
    name = getattr(file_format, "value", file_format) or "tfrecord"
    try:
        instructions = builder.info.splits[split].file_instructions
    except (KeyError, ValueError, TypeError) as e:
        return None, f"no file list for split {split!r} ({e})"
    if not instructions or not all(tf.io.gfile.exists(str(i.filename)) for i in instructions):
        return None, f"the {name} files of split {split!r} are not all on disk"
    if name == "array_record":
        source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        return source, "array_record files (tfds data source)"
    if name != "tfrecord":
        return None, f"{name} files"
    try:
        return TFRecordIndex(instructions), f"{len(instructions)} tfrecord file(s) (record offsets read from headers)"
    except ValueError as e:
        return None, str(e)


def train_batches(
    config: ml_collections.ConfigDict, builder, *, start_step: int = 0, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of ``train_batch_size / process_count`` examples, from step ``start_step``.

    Global position p (step p // train_batch_size, row p % train_batch_size) is example
    ``index_shuffle(p % N, seed=fold_in([seed, 1], p // N))`` of the N training examples, augmented with
    seed ``fold_in([seed, 2], p)``; this process reads rows ``[process_index * per_host, ...)`` of every
    step. Data without random access (see ``random_access_source``) is streamed through a shuffle buffer
    instead, and a resume there replays the examples before ``start_step`` (logged as a warning)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    _hide_accelerators_from_tf()
    data = config.data
    if data.train_batch_size % process_count:
        raise UserError(f"train_batch_size {data.train_batch_size} does not divide over {process_count} hosts")
    per_host = data.train_batch_size // process_count
    records, how = random_access_source(builder, data.train_split)

    def parse(seed, example):
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
            include_masks=needs_masks(config),
            mask_crop_size=mask_crop_size(config),
        )

    if records is None:
        logging.warning(
            "Training input: split %r cannot be read by index (%s): streaming it through a shuffle buffer; resuming "
            "at step %d replays and decodes the %d examples before it",
            data.train_split, how, start_step, start_step * per_host,
        )  # fmt: skip
        split = tfds.even_splits(data.train_split, n=process_count, drop_remainder=True)[process_index]
        ds = coco_structure(builder.as_dataset(split=split, shuffle_files=False), data)
        ds = ds.shuffle(data.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True).repeat()
        base_seed = tf.constant([config.seed, process_index], tf.int64)
        ds = ds.enumerate().map(
            lambda index, example: parse(tf.random.experimental.stateless_fold_in(base_seed, index), example),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.batch(per_host, drop_remainder=True).skip(start_step).prefetch(2)
        return iter(tfds.as_numpy(ds))

    n = len(records)
    if n == 0:
        raise UserError(f"training split {data.train_split!r} has no examples")
    first = start_step * data.train_batch_size
    logging.info(
        "Training input: split %r, %d examples read by index from %s in a new global order every epoch; step %d "
        "starts at epoch %d, example %d of it (nothing replayed)",
        data.train_split, n, how, start_step, first // n, first % n,
    )  # fmt: skip
    order_seed = tf.constant([config.seed, 1], tf.int64)
    augment_seed = tf.constant([config.seed, 2], tf.int64)

    def locate(count):  # this process's count-th example -> (global position, example index)
        position = (count // per_host) * data.train_batch_size + process_index * per_host + count % per_host
        epoch_seed = tf.random.experimental.stateless_fold_in(order_seed, position // n)
        return position, tf.random.experimental.index_shuffle(position % n, epoch_seed, n - 1)

    def read(index):
        record = tf.numpy_function(lambda i: records[int(i)], [index], tf.string, stateful=False)
        return builder.info.features.deserialize_example(tf.ensure_shape(record, []))

    located = tf.data.Dataset.range(start_step * per_host, 2**62).map(locate)
    examples = located.map(lambda _, index: read(index), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = tf.data.Dataset.zip(located.map(lambda position, _: position), coco_structure(examples, data))
    ds = ds.map(
        lambda position, example: parse(tf.random.experimental.stateless_fold_in(augment_seed, position), example),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return iter(tfds.as_numpy(ds.batch(per_host, drop_remainder=True).prefetch(2)))


def eval_batches(
    config: ml_collections.ConfigDict, builder, *, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's shard of the eval split, ``eval_batch_size / process_count`` images a batch.

    Padding rows have ``image_id`` -1: the last batch is padded to keep shapes fixed and, with several
    processes, whole padding batches follow so that every process yields ``eval_batches_per_process`` batches
    (predict is a collective call: a process with one batch fewer would leave the others waiting forever)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    _hide_accelerators_from_tf()
    data = config.data
    if data.eval_batch_size % process_count:
        raise UserError(
            f"eval_batch_size {data.eval_batch_size} does not divide over {process_count} processes: set "
            f"--config.data.eval_batch_size to a multiple of {process_count}"
        )
    per_host = data.eval_batch_size // process_count
    batches = eval_batches_per_process(config, builder, process_count) if process_count > 1 else None
    split = tfds.even_splits(data.eval_split, n=process_count)[process_index]
    ds = coco_structure(builder.as_dataset(split=split, shuffle_files=False), data)
    ds = ds.map(
        lambda ex: preprocess.preprocess(
            ex,
            training=False,
            output_size=config.model.image_size,
            max_instances=data.max_instances,
            label_map=label_map(data),
            normalization=normalization(config),
            include_masks=needs_masks(config),
            mask_crop_size=mask_crop_size(config),
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = ds.batch(per_host)
    yielded = 0
    for batch in tfds.as_numpy(ds.prefetch(2)):
        n = len(batch["image_id"])
        if n < per_host:
            batch = {k: np.concatenate([v, np.zeros((per_host - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            batch["image_id"][n:] = -1
        yielded += 1
        yield batch
    if batches is not None:
        if yielded > batches:  # even_splits' shards differ by one example at most: cannot happen
            raise RuntimeError(f"process {process_index} read {yielded} eval batches, more than the {batches} planned")
        spec = {k: (v.shape[1:], v.dtype.as_numpy_dtype) for k, v in ds.element_spec.items()}
        for _ in range(batches - yielded):
            padding = {k: np.zeros((per_host,) + tuple(shape), dtype) for k, (shape, dtype) in spec.items()}
            padding["image_id"][:] = -1
            yield padding


def eval_batches_per_process(config: ml_collections.ConfigDict, builder, process_count: int) -> int:
    """Eval batches each of ``process_count`` processes runs: its largest shard's, in batches of
    ``eval_batch_size / process_count``."""
    data = config.data
    try:
        examples = builder.info.splits[data.eval_split].num_examples
    except (KeyError, ValueError):
        examples = 0
    if not examples:
        raise UserError(
            f"the size of eval split {data.eval_split!r} is unknown, and {process_count} processes must agree on "
            "how many eval batches to run: evaluate with one process (--mode=eval without --multihost)"
        )
    return math.ceil(math.ceil(examples / process_count) / (data.eval_batch_size // process_count))


def tfds_ground_truth(config: ml_collections.ConfigDict, builder) -> dict:
    """The eval split of a tfds dataset as a COCO ground-truth dict (images, annotations, categories): every
    object of every image, with the dataset's stored ``area`` (box area when it has none) and crowd flags
    (tfds voc: ``is_difficult``), not the preprocessed batches' (cut to ``data.max_instances``); every class of
    the dataset's ClassLabel in ``categories``. Images are decoded only for their size."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    _hide_accelerators_from_tf()
    data = config.data
    mapping = label_map(data)
    label = builder.info.features["objects"]["label"]
    names = label.names if isinstance(label, tfds.features.ClassLabel) else None

    def fields(example):
        objects = example["objects"]
        out = {
            "id": example["image/id"],
            "size": tf.shape(example["image"])[:2],
            "bbox": objects["bbox"],
            "label": objects["label"],
            "crowd": objects["is_crowd"],
        }
        if "area" in objects:
            out["area"] = tf.cast(objects["area"], tf.float64)
        return out

    ds = coco_structure(builder.as_dataset(split=data.eval_split, shuffle_files=False), data)
    ds = ds.map(fields, num_parallel_calls=tf.data.AUTOTUNE)
    images, annotations, used = [], [], set()
    for example in tfds.as_numpy(ds.prefetch(8)):
        height, width = (int(v) for v in example["size"])
        images.append({"id": int(example["id"]), "height": height, "width": width})
        boxes = np.asarray(example["bbox"], np.float64).reshape(-1, 4) * [height, width, height, width]
        for j, (box, cls, crowd) in enumerate(zip(boxes, example["label"], example["crowd"], strict=True)):
            category = int(mapping[int(cls)] if mapping else cls)
            w, h = float(box[3] - box[1]), float(box[2] - box[0])
            area = float(example["area"][j]) if "area" in example else w * h
            used.add((category, int(cls)))
            annotations.append(
                {"id": len(annotations) + 1, "image_id": int(example["id"]), "category_id": category,
                 "bbox": [float(box[1]), float(box[0]), w, h], "area": area, "iscrowd": int(crowd)}
            )  # fmt: skip
    if names:  # every class of the dataset, also those without an object in the split (per-class rows: n/a)
        used |= {(int(mapping[index]) if mapping else index, index) for index in range(len(names))}
    categories = [
        {"id": category, "name": names[index] if names and 0 <= index < len(names) else str(category)}
        for category, index in sorted(used)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def dataset_categories(config: ml_collections.ConfigDict, workdir: str, builder) -> dict[int, str]:
    """{category id: name} of the training data: its COCO json's categories (COCO folder, synthetic set, a VOC
    folder's prepared json), or the tfds dataset's class names at the category ids the model trains on."""
    import tensorflow_datasets as tfds

    from scaledet_jax.data import coco_folder

    data = config.data
    split = data.train_split
    path = (getattr(builder, "annotation_jsons", None) or {}).get(split)
    if not path and data.source in ("synthetic", "coco_folder"):
        folder = data.coco_folder or os.path.join(workdir, "synthetic_data")
        path = coco_folder.json_path(folder, split)
    if path and os.path.exists(path):
        return coco_folder.category_names_from_json(path)
    label = builder.info.features["objects"]["label"]
    if not isinstance(label, tfds.features.ClassLabel):
        return {}
    mapping = label_map(data)
    return {int(mapping[i]) if mapping else i: name for i, name in enumerate(label.names)}
