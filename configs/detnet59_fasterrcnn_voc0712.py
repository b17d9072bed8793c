"""DetNet-59 FPN Faster R-CNN on PASCAL VOC 2007+2012: guoruoqian/DetNet_pytorch's network and 07+12
recipe: train on VOC07 trainval + VOC12 trainval (16,551 images), test on VOC07 test, SGD 0.9,
lr 1e-3 at batch 1, weight decay 1e-4, x0.1 after 10 of the seed's 11 epochs (each two passes:
every image and its flipped copy): 22 of our epochs, decay after 20.

Command: python main.py --config=configs/detnet59_fasterrcnn_voc0712.py --workdir=runs/detnet59_voc0712 \
    --config.data.voc_folder=/data/VOCdevkit/VOC2007,/data/VOCdevkit/VOC2012
Published (seed README, Faster R-CNN FPN, scale 600, RoI Align): VOC07 test mAP 80.7 (11-point, our
'mAP_voc07'), with ImageNet DetNet-59 weights.
"""

from scaledet_jax import defaults

VOC0712_TRAINVAL = 16551


def get_config():
    config = defaults.detnet_fasterrcnn_config()
    d = config.data
    d.source = "voc_folder"
    d.voc_folder = "VOCdevkit/VOC2007,VOCdevkit/VOC2012"  # a split is the union of the folders' split files
    d.train_split, d.eval_split = "trainval", "test"
    d.train_batch_size = 1
    config.optim.base_learning_rate = 1e-3 * 256 / 1  # lr 1e-3 at batch 1
    config.eval_protocol = "voc"
    config.checkpoint_every_steps = config.eval_every_steps = VOC0712_TRAINVAL
    return config
