"""DetNet-59 FPN Faster R-CNN on PASCAL VOC 2007: guoruoqian/DetNet_pytorch's network and recipe
(``defaults.detnet_fasterrcnn_config`` says what it is): train on VOC07 trainval, test on VOC07 test,
SGD 0.9, lr 1e-3 at batch 2, weight decay 1e-4, x0.1 after 10 of the seed's epochs. The seed's
``--epochs 12`` runs its epochs 1..11, each two passes over trainval (every image and its flipped
copy): 22 of our epochs (random flips), decay after 20.

Command: python main.py --config=configs/detnet59_fasterrcnn_voc07.py --workdir=runs/detnet59_voc07 \
    --config.data.voc_folder=/data/VOCdevkit/VOC2007
(or tfds: --config.data.source=tfds --config.data.tfds_name=voc/2007
 --config.data.train_split=train+validation --config.data.eval_split=test)
Published (seed README, Faster R-CNN FPN, scale 600, RoI Align): VOC07 test mAP 75.9 (11-point, our
'mAP_voc07'), with ImageNet DetNet-59 weights (--from=detnet-pytorch-imagenet, --config.init_from).
"""

from scaledet_jax import defaults

VOC07_TRAINVAL = 5011


def get_config():
    config = defaults.detnet_fasterrcnn_config()
    d = config.data
    d.source = "voc_folder"
    d.voc_folder = "VOCdevkit/VOC2007"
    d.train_split, d.eval_split = "trainval", "test"
    d.train_batch_size = 2
    config.eval_protocol = "voc"
    config.checkpoint_every_steps = config.eval_every_steps = VOC07_TRAINVAL // 2  # one pass
    return config
