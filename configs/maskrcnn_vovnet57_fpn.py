"""Mask R-CNN VoVNet-57-FPN: the VoVNet seed's (stigma0617/maskrcnn-benchmark-vovnet)
``e2e_mask_rcnn_V_57_FPN_2x`` network and 2x COCO recipe (``defaults.vovnet_rcnn_config`` says what it is).

Command: python main.py --config=configs/maskrcnn_vovnet57_fpn.py --workdir=runs/maskrcnn_vovnet57_fpn \
    --config.data.source=coco_folder --config.data.coco_folder=/data/coco \
    --config.data.train_split=train2017 --config.data.eval_split=val2017
Published (seed README, COCO minival, 2x): 42.0 box AP / 37.5 mask AP.
Its checkpoints convert with --from=maskrcnn-benchmark (README, "Converting PyTorch checkpoints").
"""

from scaledet_jax import defaults


def get_config():
    return defaults.vovnet_rcnn_config(depth=57, masks=True)
